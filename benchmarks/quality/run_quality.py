"""Quality of the methods on the built-in oracle task over several seeds, and GVM vs reward-model pairwise
accuracy on held-out Anthropic HH harmless pairs.

1. ``dvpo demo`` with DVPO, PPO-RLHF, DPO and VPO (offline) for each seed (task and training seeds both
   set to it); reported per method: mean ± std over seeds of the oracle reward r* and of the KL to the
   reference on the held-out prompts. ``--scale gpu`` uses a larger model and longer runs.
2. A GVM (``dvpo gvm``) and a Bradley-Terry reward model (``dvpo rm``) trained from scratch with the same
   architecture, tokenizer, data split and steps on the HH harmless test pairs; their held-out pairwise
   accuracies (the GVM's last-state value, the reward model's last-token score).

Writes ``quality_<device>.json`` and ``.md`` under ``--out`` (default ``benchmarks/results``).

    python benchmarks/quality/run_quality.py                      # CPU scale, 3 seeds
    python benchmarks/quality/run_quality.py --scale gpu --device cuda
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import REPO, environment  # noqa: E402

from dvpo.config import load_config  # noqa: E402
from dvpo.stages import STAGES  # noqa: E402

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SCALES = {
    "cpu": {"schedule.rl_steps": "150", "schedule.dpo_steps": "150", "schedule.eval_every": "25"},
    "gpu": {"model.hidden_size": "256", "model.num_layers": "4", "model.num_heads": "8", "task.n_words": "32",
            "task.n_topics": "8", "task.pair_prompts": "20000", "task.rl_prompts": "4096",
            "schedule.sft_steps": "600", "schedule.value_steps": "2000", "schedule.rl_steps": "400",
            "schedule.dpo_steps": "400", "schedule.eval_every": "50"},
}
HH_VALUE = {"model.path": "null", "model.vocab_size": "512", "model.hidden_size": "64", "model.num_layers": "2",
            "model.num_heads": "4", "data.eval_fraction": "0.1", "data.max_length": "192", "train.epochs": "2",
            "train.batch_size": "32", "train.lr": "1e-3", "train.warmup_ratio": "0.05", "train.progress_bar": "false"}


def run(stage: str, overrides: dict):
    cfg = load_config(STAGES[stage].config_cls, None, list(overrides.items()))
    return STAGES[stage].run(cfg)


def reward_at_kl(curve: list[dict], kl: float) -> float | None:
    """Linear interpolation of a method's checkpoint rewards at ``kl`` (None outside the KL range it covered)."""
    points = sorted((c["kl"], c["reward"]) for c in curve)
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k0 <= kl <= k1:
            return r0 + (r1 - r0) * (kl - k0) / (k1 - k0) if k1 > k0 else r1
    return None


def mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Oracle task, {len(report['seeds'])} seeds ({', '.join(map(str, report['seeds']))}), scale "
             f"{report['scale']}, on {env['device']} (torch {env['torch']}, git {env['git_sha'][:12]}"
             f"{' dirty' if env['git_dirty'] else ''}). Mean ± std over seeds on held-out prompts.", "",
             "| method | oracle reward r* | KL to reference |", "|---|---:|---:|"]
    for name, r in report["methods"].items():
        lines.append(f"| {name.upper()} | {r['reward']['mean']:.3f} ± {r['reward']['std']:.3f} | "
                     f"{r['kl']['mean']:.3f} ± {r['kl']['std']:.3f} |")
    lines.append(f"| optimum | {report['optimum']['mean']:.3f} | |")
    eq = report["equal_kl"]
    lines += ["", "At equal KL (both checkpoint curves interpolated at the largest KL both reached), per seed: "
                  + "; ".join(f"KL {k:.2f}: DVPO {d:.3f} vs PPO {p:.3f}"
                              for k, d, p in zip(eq["kl"], eq["dvpo"], eq["ppo"])) + "."]
    acc = report["oracle_pair_accuracy"]
    lines += ["", "Held-out pairwise accuracy on the oracle task's pairs: GVM "
                  f"{acc['gvm']['mean']:.3f} ± {acc['gvm']['std']:.3f}, RM {acc['rm']['mean']:.3f} ± {acc['rm']['std']:.3f}."]
    if report.get("hh"):
        hh = report["hh"]
        lines += ["", f"Anthropic HH harmless test pairs, models trained from scratch ({hh['train_pairs']} training pairs, "
                      f"{hh['eval_pairs']} held out, 2-layer hidden-64 Llama, same split and steps): GVM "
                      f"{hh['gvm_pair_acc_last']:.3f} (last state), {hh['gvm_pair_acc_mean']:.3f} (mean over the "
                      f"response); reward model {hh['rm_pair_acc']:.3f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "quality")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--skip-hh", action="store_true", help="skip the HH GVM-vs-RM accuracy part")
    ap.add_argument("--report-only", action="store_true",
                    help="rebuild the report from the runs already in --work (no training)")
    args = ap.parse_args()

    per_method: dict[str, dict[str, list[float]]] = {}
    optimum, gvm_acc, rm_acc, equal_kl = [], [], [], {"kl": [], "dvpo": [], "ppo": []}
    for seed in args.seeds:
        folder = args.work / f"seed{seed}"
        if args.report_only:
            result = json.loads((folder / "results.json").read_text())
        else:
            result = run("demo", {**SCALES[args.scale], "methods": "[dvpo,ppo,dpo,vpo]", "seed": str(seed),
                                  "task.seed": str(seed), "device": args.device, "output_dir": str(folder)})
        # both checkpoint curves at the largest KL both reached
        kl = min(max(c["kl"] for c in result["curves"][m]) for m in ("DVPO", "PPO"))
        equal_kl["kl"].append(kl)
        equal_kl["dvpo"].append(reward_at_kl(result["curves"]["DVPO"], kl))
        equal_kl["ppo"].append(reward_at_kl(result["curves"]["PPO"], kl))
        optimum.append(result["optimum_reward"])
        gvm_acc.append(result["accuracy"]["gvm_pair_acc"])
        rm_acc.append(result["accuracy"]["rm_pair_acc"])
        for name, r in result["methods"].items():
            slot = per_method.setdefault(name, {"reward": [], "kl": []})
            slot["reward"].append(r["reward"])
            slot["kl"].append(r["kl"])

    hh = None
    if args.report_only and (args.out / "quality_cpu.json").is_file():
        hh = json.loads((args.out / "quality_cpu.json").read_text()).get("hh")
    elif not args.skip_hh and HH.is_file():
        common = {**HH_VALUE, "data.pairs": f"[{HH}]", "train.device": args.device, "train.seed": "0"}
        gvm = run("gvm", {**common, "train.output_dir": str(args.work / "hh_gvm")})
        rm = run("rm", {**common, "train.output_dir": str(args.work / "hh_rm")})
        stats = json.loads((args.work / "hh_gvm" / "data_stats.json").read_text())
        hh = {"gvm_pair_acc_last": gvm["eval/pair_acc_last"], "gvm_pair_acc_mean": gvm["eval/pair_acc_mean"],
              "rm_pair_acc": rm["eval/pair_acc"], "eval_pairs": int(gvm["eval/pairs"]),
              "train_pairs": stats["train pairs"]["kept"]}

    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")
    report = {"environment": environment(device), "scale": args.scale, "seeds": args.seeds,
              "optimum": mean_std(optimum),
              "methods": {k: {m: mean_std(v) for m, v in d.items()} for k, d in per_method.items()},
              "oracle_pair_accuracy": {"gvm": mean_std(gvm_acc), "rm": mean_std(rm_acc)}, "equal_kl": equal_kl,
              "hh": hh}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    (args.out / f"quality_{tag}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"quality_{tag}.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
