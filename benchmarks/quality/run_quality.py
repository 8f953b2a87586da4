"""Quality of the methods on the built-in oracle task over several seeds, and GVM vs reward-model pairwise
accuracy on held-out Anthropic HH harmless pairs.

1. ``dvpo demo`` with DVPO, PPO-RLHF, DPO and VPO (offline) for each seed (task and training seeds both
   set to it). The comparison is at equal KL: per seed, every method's checkpoint curve (oracle reward
   against KL to the reference) is interpolated at the largest KL all methods reached; reported per
   method: the per-seed values, mean ± std and a 95% t-interval over seeds; the final reward and KL too.
   ``--scale gpu`` uses a larger model and longer runs.
2. A GVM (``dvpo gvm``) and a Bradley-Terry reward model (``dvpo rm``) trained from scratch with the same
   architecture, tokenizer, data split, batches and optimizer updates (one pass per GVM batch) on the HH
   harmless test pairs; their held-out pairwise accuracies (the GVM's last-state value, the reward
   model's last-token score).

Writes ``quality_<device>.json`` (with every seed's checkpoint curves), ``.md`` and one
``quality_<device>_reward_vs_kl_seed<N>.svg`` per seed under ``--out`` (default ``benchmarks/results``).

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
from dvpo.plot import line_chart  # noqa: E402
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


# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_std(xs: list[float]) -> dict:
    n = len(xs)
    std = statistics.stdev(xs) if n > 1 else 0.0
    half = T95.get(n - 1, 1.96) * std / n ** 0.5 if n > 1 else float("nan")
    return {"mean": statistics.fmean(xs), "std": std, "ci95": [statistics.fmean(xs) - half,
                                                              statistics.fmean(xs) + half], "values": xs}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"Oracle task, {len(report['seeds'])} seeds ({', '.join(map(str, report['seeds']))}), scale "
             f"{report['scale']}, on {env['device']} (torch {env['torch']}, git {env['git_sha'][:12]}"
             f"{' dirty' if env['git_dirty'] else ''}). Held-out prompts; mean ± std over seeds, [95% t-interval].",
             "", "Oracle reward at equal KL (per seed, every method's checkpoint curve interpolated at the largest "
             "KL all methods reached: " + ", ".join(f"seed {s} KL {k:.2f}" for s, k in
                                                    zip(report["seeds"], report["equal_kl"]["kl"])) + "):", "",
             "| method | per seed | mean ± std | 95% interval |", "|---|---|---:|---:|"]
    for name, r in report["equal_kl"]["reward"].items():
        lines.append(f"| {name.upper()} | {', '.join(f'{v:.3f}' for v in r['values'])} | {r['mean']:.3f} ± "
                     f"{r['std']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] |")
    lines += ["", "Final checkpoints (methods end at different KLs, so this table does not rank them):", "",
              "| method | oracle reward r* | KL to reference |", "|---|---:|---:|"]
    for name, r in report["methods"].items():
        lines.append(f"| {name.upper()} | {r['reward']['mean']:.3f} ± {r['reward']['std']:.3f} | "
                     f"{r['kl']['mean']:.3f} ± {r['kl']['std']:.3f} |")
    lines.append(f"| optimum | {report['optimum']['mean']:.3f} | |")
    if report.get("epochs"):
        lines += ["", "Passes over the training pairs (updates x batch / pairs; GVM and RM make the same updates on "
                      "the same batches): " + ", ".join(f"{k.upper()} {v['mean']:.2f}"
                                                       for k, v in report["epochs"].items()) + "."]
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
    optimum, gvm_acc, rm_acc, curves = [], [], [], {}
    equal_kl: dict = {"kl": [], "reward": {}}
    epochs: dict[str, list[float]] = {}
    for seed in args.seeds:
        folder = args.work / f"seed{seed}"
        if args.report_only:
            result = json.loads((folder / "results.json").read_text())
        else:
            result = run("demo", {**SCALES[args.scale], "methods": "[dvpo,ppo,dpo,vpo]", "seed": str(seed),
                                  "task.seed": str(seed), "device": args.device, "output_dir": str(folder)})
        curves[seed] = result["curves"]
        equal_kl["kl"].append(result["equal_kl"]["kl"])
        for name, r in result["equal_kl"]["reward"].items():
            equal_kl["reward"].setdefault(name, []).append(r)
        for name, e in result.get("epochs", {}).items():
            epochs.setdefault(name, []).append(e)
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
        # one pass per GVM batch: the GVM and the reward model make the same updates
        gvm = run("gvm", {**common, "gvm.epochs_per_batch": "1", "train.output_dir": str(args.work / "hh_gvm")})
        rm = run("rm", {**common, "train.output_dir": str(args.work / "hh_rm")})
        stats = json.loads((args.work / "hh_gvm" / "data_stats.json").read_text())
        hh = {"gvm_pair_acc_last": gvm["eval/pair_acc_last"], "gvm_pair_acc_mean": gvm["eval/pair_acc_mean"],
              "rm_pair_acc": rm["eval/pair_acc"], "eval_pairs": int(gvm["eval/pairs"]),
              "train_pairs": stats["train pairs"]["kept"]}

    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")
    report = {"environment": environment(device), "scale": args.scale, "seeds": args.seeds,
              "optimum": mean_std(optimum),
              "methods": {k: {m: mean_std(v) for m, v in d.items()} for k, d in per_method.items()},
              "oracle_pair_accuracy": {"gvm": mean_std(gvm_acc), "rm": mean_std(rm_acc)},
              "equal_kl": {"kl": equal_kl["kl"], "reward": {k: mean_std(v) for k, v in equal_kl["reward"].items()}},
              "epochs": {k: mean_std(v) for k, v in epochs.items()}, "curves": curves, "hh": hh}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    (args.out / f"quality_{tag}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"quality_{tag}.md").write_text(to_markdown(report))
    for seed, seed_curves in curves.items():
        (args.out / f"quality_{tag}_reward_vs_kl_seed{seed}.svg").write_text(line_chart(
            {k: [(c["kl"], c["reward"]) for c in v] for k, v in seed_curves.items()},
            title=f"Oracle reward against KL to the reference, seed {seed}", xlabel="KL(pi || pi_ref), nats",
            ylabel="mean oracle reward r*"))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
