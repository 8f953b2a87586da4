"""``dvpo demo``: the whole comparison on the built-in oracle task, on a CPU in minutes.

The task (``dvpo.tasks.OracleTask``) is a small synthetic language whose hidden reward r*(x, y) is a sum of
per-token terms. The demo writes its data, then runs each stage as its own ``dvpo <stage>`` process from a
YAML file it writes under ``<output_dir>/configs`` (rerun any of them by hand):

1. ``sft`` on the task's weak-teacher corpus -> the reference policy;
2. preference pairs: two responses per prompt sampled from the SFT policy, labelled by a Bradley-Terry draw
   on r* (the oracle is used only for these labels and for evaluation);
3. ``gvm`` and ``rm`` on those pairs (both start from the SFT backbone);
4. ``dvpo`` (frozen GVM), ``ppo`` (reward model + online critic) and ``dpo`` from the SFT policy.

Then every policy samples one response per held-out prompt with the same seed and is scored by the oracle
(mean r*) and by its KL to the reference; every method's checkpoints give reward-vs-step and reward-vs-KL
curves, and the methods are compared at one KL (each curve interpolated at the largest KL all of them
reached), since a method that drifts further from the reference is not better for it. The table
(``results.md``, ``results.json``) lists oracle reward, KL, the equal-KL rewards, GVM/RM pairwise accuracy,
passes over the pairs, time per step and peak memory (the process's peak RSS on CPU,
``max_memory_allocated`` on CUDA); ``reward_vs_step.svg`` and ``reward_vs_kl.svg`` are the plots.
"""
from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
import yaml

from ..config import ConfigError, option, section
from ..models import load_tokenizer
from ..models.policy import stop_token_ids
from ..plot import line_chart
from transformers.utils import logging as hf_logging

from ..rollout import generate
from ..tasks import OracleTask
from ..tasks.evaluate import load_policy, oracle_scores
from ..trainer import resolve_device, seed_everything
from .registry import register_stage

log = logging.getLogger(__name__)

METHODS = ("dvpo", "ppo", "dpo", "vpo")
DEFAULT_METHODS = ("dvpo", "ppo", "dpo")


@dataclass
class DemoTaskConfig:
    seed: int = option(0, "seed of the oracle task (its reward tables, prompts and corpora)")
    n_topics: int = option(4, "topic words (the prompt's first word selects the per-word scores)")
    n_words: int = option(16, "response words")
    sft_examples: int = option(4000, "weak-teacher demonstrations for SFT")
    pair_prompts: int = option(8000, "prompts whose two SFT samples become a labelled preference pair")
    rl_prompts: int = option(1024, "training prompts of the RL stages")
    eval_prompts: int = option(128, "held-out prompts every policy is scored on")


@dataclass
class DemoModelConfig:
    hidden_size: int = option(64, "hidden size of the policy / GVM / reward model (Llama style, built from config)")
    num_layers: int = option(2, "transformer layers")
    num_heads: int = option(4, "attention heads")


@dataclass
class DemoScheduleConfig:
    sft_steps: int = option(150, "SFT steps (batch 64)")
    value_steps: int = option(800, "GVM and reward-model steps (batch 32 pairs)")
    rl_steps: int = option(150, "DVPO and PPO steps (batch 32 prompts)")
    dpo_steps: int = option(150, "DPO and VPO steps (batch 32 pairs)")
    eval_every: int = option(25, "RL steps between checkpoints scored for the reward-vs-step curve")
    rl_lr: float = option(3e-4, "learning rate of the DVPO / PPO policy")
    kl_coef: float = option(0.05, "KL coefficient of DVPO and PPO (fixed in the demo: its runs are too short for "
                                  "the adaptive controller's 10,000-sequence horizon)")
    dpo_beta: float = option(0.1, "DPO (and VPO) beta")

    def validate(self) -> None:
        for name in ("sft_steps", "value_steps", "rl_steps", "dpo_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"schedule.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DemoConfig:
    task: DemoTaskConfig = section(DemoTaskConfig, "the built-in oracle task")
    model: DemoModelConfig = section(DemoModelConfig, "model size (every model of the demo)")
    schedule: DemoScheduleConfig = section(DemoScheduleConfig, "training lengths and the RL settings")
    methods: list[str] = option(default_factory=lambda: list(DEFAULT_METHODS),
                                help="which of dvpo, ppo, dpo, vpo (offline, pi_cal = chosen) to run")
    output_dir: str = option("runs/demo", "folder for data, configs, runs, logs and the results", path=True,
                             output=True)
    device: str = option("cpu", "cpu, cuda, or auto")
    seed: int = option(0, "training seed of every stage")

    def validate(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ConfigError(f"methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")


# --- data ------------------------------------------------------------------------------------

def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def sample_pairs(task: OracleTask, sft: Path, prompts: list[str], *, seed: int, max_new_tokens: int) -> list[dict]:
    """Two samples per prompt from the SFT policy, labelled by a Bradley-Terry draw on the oracle."""
    tokenizer = load_tokenizer(str(sft))
    model = load_policy(sft, sft, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    pairs = []
    for start in range(0, len(prompts), 256):
        batch = prompts[start:start + 256]
        ids = [tokenizer.encode(p) for p in batch for _ in range(2)]
        rollout = generate(model, ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=stop_token_ids(model, tokenizer), generator=generator)
        texts = [tokenizer.decode(rollout.responses[r, :n].tolist(), skip_special_tokens=True)
                 for r, n in enumerate(rollout.response_lengths.tolist())]
        for i, prompt in enumerate(batch):
            a, b = texts[2 * i], texts[2 * i + 1]
            if a != b and a.strip() and b.strip():
                pairs.append(task.label(prompt, a, b, rng))
    return pairs


# --- stage runs ------------------------------------------------------------------------------

class StageRunner:
    """Writes a stage's YAML config and runs ``dvpo <stage>`` in a child process; records wall time and the
    child's peak resident memory."""

    def __init__(self, root: Path):
        self.root = root
        (root / "configs").mkdir(parents=True, exist_ok=True)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}

    def __call__(self, name: str, stage: str, config: dict) -> Path:
        path = self.root / "configs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        log_path = self.root / "logs" / f"{name}.log"
        start = time.perf_counter()
        with open(log_path, "w", encoding="utf-8") as out:
            proc = subprocess.Popen([sys.executable, "-m", "dvpo", stage, str(path)], stdout=out,
                                    stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = log_path.read_text(encoding="utf-8").splitlines()[-15:]
            raise RuntimeError(f"dvpo {stage} ({name}) failed with exit code {proc.returncode}; "
                               f"log {log_path}:\n" + "\n".join(tail))
        self.records[name] = {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}
        log.info("demo: %-4s done in %5.1f s (peak RSS %.0f MB)", name, seconds, usage.ru_maxrss / 1024)
        return Path(config["train"]["output_dir"])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def seconds_per_step(run: Path) -> float:
    """Mean ``timing_s/step`` when the stage logs it, else the spacing of the metric lines (one line: its
    time since the logger started over its step)."""
    rows = [r for r in _metrics(run) if "train/lr" in r]
    timed = [r["timing_s/step"] for r in rows if "timing_s/step" in r]
    if timed:
        return sum(timed) / len(timed)
    if len(rows) == 1:
        return rows[0]["time"] / max(1, rows[0]["step"])
    return (rows[-1]["time"] - rows[0]["time"]) / max(1, len(rows) - 1)


def peak_gpu_gb(run: Path) -> float | None:
    values = [r["perf/max_memory_allocated_gb"] for r in _metrics(run) if "perf/max_memory_allocated_gb" in r]
    return max(values) if values else None


# --- the demo --------------------------------------------------------------------------------

@register_stage("demo", DemoConfig, "sft -> gvm -> dvpo vs rm -> ppo and dpo on the built-in oracle task, "
                                    "with a results table and plot", __doc__.split("\n\n", 1)[1])
def run(cfg: DemoConfig) -> dict:
    seed_everything(cfg.seed)
    hf_logging.disable_progress_bar()
    root = Path(cfg.output_dir)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    task = OracleTask(seed=cfg.task.seed, n_topics=cfg.task.n_topics, n_words=cfg.task.n_words)
    tok_dir = root / "tokenizer"
    task.tokenizer().save_pretrained(tok_dir)
    max_new = task.max_response_len + 1  # words + EOS

    sft_file = _write_jsonl(data / "sft.jsonl", task.sft_corpus(cfg.task.sft_examples))
    rl_prompts = task.prompts(cfg.task.rl_prompts, seed=11)
    eval_prompts = task.prompts(cfg.task.eval_prompts, seed=12)
    prompt_file = _write_jsonl(data / "prompts.jsonl", [{"prompt": p} for p in rl_prompts])
    eval_file = _write_jsonl(data / "eval_prompts.jsonl", [{"prompt": p} for p in eval_prompts])

    m, s = cfg.model, cfg.schedule
    model = {"hidden_size": m.hidden_size, "num_layers": m.num_layers, "num_heads": m.num_heads}
    common = {"seed": cfg.seed, "device": cfg.device, "progress_bar": False, "save_total_limit": 0}
    run_stage = StageRunner(root)

    def train(name: str, **kw) -> dict:
        return {"output_dir": str(root / "runs" / name), **common, **kw}

    sft = run_stage("sft", "sft", {
        "model": {**model, "tokenizer": str(tok_dir)},
        "data": {"train": [str(sft_file)], "eval_fraction": 0.05, "max_length": 32},
        "train": train("sft", max_steps=s.sft_steps, batch_size=64, lr=3e-3, warmup_ratio=0.05)}) / "final"

    pairs = sample_pairs(task, sft, task.prompts(cfg.task.pair_prompts, seed=10), seed=cfg.seed,
                         max_new_tokens=max_new)
    pair_file = _write_jsonl(data / "pairs.jsonl", pairs)
    log.info("demo: %d labelled preference pairs from the SFT policy", len(pairs))

    value_data = {"pairs": [str(pair_file)], "eval_fraction": 0.1, "max_length": 32}
    value_train = {"max_steps": s.value_steps, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.05}
    gvm = rm = None
    if "dvpo" in cfg.methods:
        # One pass per batch: the GVM and the reward model see the same batches and make the same number of
        # optimizer updates.
        gvm = run_stage("gvm", "gvm", {"model": {"path": str(sft)}, "data": value_data, "gvm": {"epochs_per_batch": 1},
                                       "train": train("gvm", **value_train)}) / "final"
    if "ppo" in cfg.methods:
        rm = run_stage("rm", "rm", {"model": {"path": str(sft)}, "data": value_data,
                                    "train": train("rm", **value_train)}) / "final"

    rl = {"data": {"prompts": [str(prompt_file)], "eval_prompts": [str(eval_file)], "eval_size": 32,
                   "max_length": 32},
          "rollout": {"max_new_tokens": max_new}, "actor": {"ppo_epochs": 2, "mini_batch_size": 16},
          "kl": {"coef": s.kl_coef, "adaptive": False}}
    rl_train = {"max_steps": s.rl_steps, "batch_size": 32, "lr": s.rl_lr, "warmup_steps": 2,
                "save_every": s.eval_every, "eval_every": 0}
    runs: dict[str, Path] = {}
    if "dvpo" in cfg.methods:
        runs["dvpo"] = run_stage("dvpo", "dvpo", {"model": {"path": str(sft)}, "gvm": {"path": str(gvm)}, **rl,
                                                  "train": train("dvpo", **rl_train)})
    if "ppo" in cfg.methods:
        runs["ppo"] = run_stage("ppo", "ppo", {"model": {"path": str(sft)}, "reward": {"path": str(rm)},
                                               "critic": {"lr": 1e-3}, **rl, "train": train("ppo", **rl_train)})
    preference = {"model": {"path": str(sft)}, "data": {"pairs": [str(pair_file)], "eval_fraction": 0.05,
                                                        "max_length": 32}, "dpo": {"beta": s.dpo_beta}}
    pref_train = {"max_steps": s.dpo_steps, "batch_size": 32, "lr": 1e-3, "warmup_ratio": 0.05,
                  "save_every": s.eval_every}
    if "dpo" in cfg.methods:
        runs["dpo"] = run_stage("dpo", "dpo", {**preference, "train": train("dpo", **pref_train)})
    if "vpo" in cfg.methods:
        runs["vpo"] = run_stage("vpo", "vpo", {**preference, "vpo": {"mode": "offline", "calibration": "chosen"},
                                               "train": train("vpo", **pref_train)})

    return report(cfg, root, task, sft, eval_prompts, runs, run_stage.records, gvm, rm, device, max_new)


def report(cfg: DemoConfig, root: Path, task: OracleTask, sft: Path, eval_prompts: list[str], runs: dict[str, Path],
           records: dict, gvm: Path | None, rm: Path | None, device: torch.device, max_new: int) -> dict:
    """Score every policy on the held-out prompts, write results.json / results.md / reward_vs_step.svg."""
    tokenizer = load_tokenizer(str(sft))
    reference = load_policy(sft, sft, device)

    def score(folder: Path) -> dict:
        return oracle_scores(load_policy(folder, sft, device), reference, tokenizer, task, eval_prompts,
                             max_new_tokens=max_new, seed=cfg.seed + 1)

    optimum = sum(task.optimum(p) for p in eval_prompts) / len(eval_prompts)
    rows = {"sft": {**score(sft), "seconds_per_step": seconds_per_step(root / "runs" / "sft"),
                    "peak_rss_mb": records["sft"]["peak_rss_mb"]}}
    curves: dict[str, list[dict]] = {}  # per RL method: step, reward, kl of each checkpoint
    for name, run_dir in runs.items():
        rows[name] = {**score(run_dir / "final"), "seconds_per_step": seconds_per_step(run_dir),
                      "peak_rss_mb": records[name]["peak_rss_mb"], "peak_gpu_gb": peak_gpu_gb(run_dir)}
        steps = sorted(int(p.name.rsplit("_", 1)[1]) for p in run_dir.glob("global_step_*"))
        curves[name.upper()] = [{"step": 0, **rows["sft"]}] + [
            {"step": k, **score(run_dir / f"global_step_{k}")} for k in steps]
    accuracy = {}
    if gvm is not None:
        accuracy["gvm_pair_acc"] = json.loads((gvm.parent / "eval.json").read_text())["eval/pair_acc_last"]
    if rm is not None:
        accuracy["rm_pair_acc"] = json.loads((rm.parent / "eval.json").read_text())["eval/pair_acc"]
    result = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
              "git_sha": _git_sha(), "optimum_reward": optimum, "methods": rows,
              "accuracy": accuracy, "curves": curves, "equal_kl": equal_kl_rewards(curves),
              "epochs": _epochs(root, runs, gvm, rm),
              "stage_seconds": {k: v["seconds"] for k, v in records.items()}}
    (root / "results.json").write_text(json.dumps(result, indent=2))
    if curves:
        (root / "reward_vs_step.svg").write_text(line_chart(
            {k: [(c["step"], c["reward"]) for c in v] for k, v in curves.items()},
            title="Oracle reward on held-out prompts", xlabel="RL step", ylabel="mean oracle reward r*",
            hlines={"SFT": rows["sft"]["reward"], "optimum": optimum}))
        (root / "reward_vs_kl.svg").write_text(line_chart(
            {k: [(c["kl"], c["reward"]) for c in v] for k, v in curves.items()},
            title="Oracle reward against KL to the reference (checkpoints)", xlabel="KL(pi || pi_ref), nats",
            ylabel="mean oracle reward r*"))
    table = markdown_table(result)
    (root / "results.md").write_text(table)
    print(table)
    return result


def reward_at_kl(curve: list[dict], kl: float) -> float | None:
    """Linear interpolation of a method's checkpoint rewards at ``kl`` (None outside the KL range it covered)."""
    points = sorted((c["kl"], c["reward"]) for c in curve)
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r1
    return None


def equal_kl_rewards(curves: dict[str, list[dict]]) -> dict:
    """Every method's reward at one KL: the largest KL that every checkpoint curve reached (each curve starts at
    the reference, KL 0), so no method is extrapolated. Methods that spend more KL are not credited for it."""
    if not curves:
        return {}
    kl = min(max(c["kl"] for c in curve) for curve in curves.values())
    return {"kl": kl, "reward": {name: reward_at_kl(curve, kl) for name, curve in curves.items()}}


def _epochs(root: Path, runs: dict[str, Path], gvm: Path | None, rm: Path | None) -> dict[str, float]:
    """Passes over its training pairs each pair-trained stage made (optimizer updates x batch / pairs)."""
    out = {}
    for name, folder in {**{k: v for k, v in runs.items() if k in ("dpo", "vpo")},
                         **({"gvm": gvm.parent} if gvm else {}), **({"rm": rm.parent} if rm else {})}.items():
        stats_file, config_file = folder / "data_stats.json", folder / "config.yaml"
        if not (stats_file.is_file() and config_file.is_file()):
            continue
        stats = json.loads(stats_file.read_text())
        pairs = next((v["kept"] for k, v in stats.items() if k.startswith("train")), 0)
        train = yaml.safe_load(config_file.read_text())["train"]
        out[name] = train["max_steps"] * train["batch_size"] / max(pairs, 1)
    return out


def _git_sha() -> str:
    """The commit of the code that ran, when it runs from a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(result: dict) -> str:
    lines = [f"Oracle task, {len(result['methods']) - 1} methods from the same SFT policy (device "
             f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}, git "
             f"{result['git_sha'][:12]}); oracle optimum {result['optimum_reward']:.3f}.",
             "", "| method | oracle reward | KL to ref | response length | s / step | peak memory |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in result["methods"].items():
        memory = f"{r['peak_gpu_gb']:.2f} GB GPU" if r.get("peak_gpu_gb") else f"{r['peak_rss_mb']:.0f} MB RSS"
        lines.append(f"| {name.upper()} | {r['reward']:.3f} | {r['kl']:.3f} | {r['length']:.2f} | "
                     f"{r['seconds_per_step']:.3f} | {memory} |")
    eq = result.get("equal_kl")
    if eq:
        lines += ["", f"At equal KL {eq['kl']:.3f} (every method's checkpoint curve interpolated at the largest KL all "
                      "reached): " + ", ".join(f"{name} {r:.3f}" for name, r in eq["reward"].items()) + "."]
    if result.get("epochs"):
        lines += ["", "Passes over the training pairs: " + ", ".join(
            f"{name.upper()} {e:.2f}" for name, e in result["epochs"].items()) + "."]
    acc = result["accuracy"]
    if acc:
        lines += ["", "Held-out pairwise accuracy: " + ", ".join(
            f"{k.split('_')[0].upper()} {v:.3f}" for k, v in acc.items()) + "."]
    return "\n".join(lines) + "\n"
