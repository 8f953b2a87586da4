"""One RLHF training step, four ways, on the same policy architecture, batch and lengths:

- ``ppo_unfused``: PPO-RLHF as frameworks run it -- policy + online critic trained, frozen reward model and
  reference; materialised logits + log_softmax, Python-loop GAE;
- ``ppo_fused``: the same with dvpo_kernels (no logits tensor, one GAE kernel);
- ``dvpo_fused``: DVPO -- policy trained, frozen GVM and reference, no reward model, no critic update;
- ``dvpo_unfused``: DVPO with the frameworks' logits path and loop advantages.

Each variant builds its models from a Qwen2-style config (random weights, bf16 on the GPU; about 0.5B
parameters by default), then runs the trainers' own step code (``dvpo.rl``, ``dvpo.stages.ppo``) on random
prompts with responses of exactly ``--new-tokens`` tokens (no EOS), so every variant does the same work.
Per step it records ``timing_s/*`` per phase (gen, old_log_prob, ref, values, adv, update_actor,
update_critic, step) and the peak of ``torch.cuda.max_memory_allocated`` (weights, optimizer states and
activations: everything the step holds). Reported: medians over the measured steps, the time without
generation (generation code is shared by all four), the generation share, and ratios against PPO unfused
and PPO fused.

    python benchmarks/e2e/bench_rlhf_step.py                 # GPU, ~0.5B, batch 32, prompt 128, 256 new tokens
    python benchmarks/e2e/bench_rlhf_step.py --tiny --cpu    # a tiny model on the CPU: checks the script only

Writes ``rlhf_step_<device>.json`` and ``.md`` under ``--out`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import REPO, environment  # noqa: E402

from dvpo.models import PolicyModel, ValueModel  # noqa: E402
from dvpo.rl import ActorConfig, ActorUpdater, KLConfig, RolloutConfig, frozen, updates_per_step  # noqa: E402
from dvpo.stages.dvpo import DVPOStep, GVMCriticConfig  # noqa: E402
from dvpo.stages.ppo import CriticConfig, PPOStep  # noqa: E402
from dvpo.trainer import TrainConfig, build_optimizer, build_scheduler, trainable_parameters  # noqa: E402

VARIANTS = ("ppo_unfused", "ppo_fused", "dvpo_fused", "dvpo_unfused")
PHASES = ("gen", "old_log_prob", "ref", "values", "adv", "update_actor", "update_critic", "step")
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1000)


def model_config(sizes: dict) -> Qwen2Config:
    return Qwen2Config(**sizes, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                       num_labels=1)


def build(variant: str, args, device: torch.device):
    """Models, optimizers and the step object of one variant; every model starts from the same seed."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(TINY if args.tiny else QWEN_05B)
    kw = {"attn_implementation": "sdpa", "dtype": dtype}

    def causal_lm():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, **kw).to(device)

    def value_model():
        torch.manual_seed(1)
        return ValueModel(AutoModelForTokenClassification.from_config(config, **kw).to(device))

    policy = PolicyModel(causal_lm())
    if args.gradient_checkpointing:
        policy.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = frozen(PolicyModel(causal_lm()), device, False)
    kernels = "unfused" if variant.endswith("unfused") else "fused"
    actor_cfg = ActorConfig(kernels=kernels, mini_batch_size=args.mini_batch, ppo_epochs=1)
    train = TrainConfig(lr=1e-6, batch_size=args.batch, micro_batch_size=args.micro_batch)
    optimizer = build_optimizer(policy, train)
    scheduler = build_scheduler(optimizer, train, 10 * updates_per_step(actor_cfg, args.batch))
    actor = ActorUpdater(policy, optimizer, scheduler, trainable_parameters(policy), actor_cfg,
                         global_batch=args.batch, micro=args.micro_batch, max_grad_norm=1.0, seed=0, device=device,
                         bf16=False)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(1, config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()
    common = dict(policy=policy, reference=reference, prompts=prompts,
                  tokenizer=SimpleNamespace(pad_token_id=0, eos_token_id=None),
                  rollout=RolloutConfig(max_new_tokens=args.new_tokens, engine=args.engine),
                  kl=KLConfig(coef=0.05, adaptive=False), actor=actor, micro=args.micro_batch, seed=0, device=device,
                  bf16=False)
    if variant.startswith("dvpo"):
        gvm = frozen(value_model(), device, False)
        return DVPOStep(gvm=gvm, gvm_cfg=GVMCriticConfig(path="-"), **common)
    reward_model = frozen(value_model(), device, False)
    critic = value_model()
    if args.gradient_checkpointing:
        critic.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    critic_optimizer = build_optimizer(critic, train)
    critic_scheduler = build_scheduler(critic_optimizer, train, 10 * updates_per_step(actor_cfg, args.batch))
    return PPOStep(critic=critic, reward_model=reward_model, critic_cfg=CriticConfig(), critic_optimizer=critic_optimizer,
                   critic_scheduler=critic_scheduler, max_grad_norm=1.0, **common)


def run_variant(variant: str, args, device: torch.device) -> dict:
    step = build(variant, args, device)
    params = sum(p.numel() for p in step.policy.parameters())
    rows = []
    for i in range(args.warmup + args.steps):
        metrics = step(list(range(args.batch)), i + 1)
        if i >= args.warmup:
            rows.append(metrics)
    med = {p: statistics.median(float(r.get(f"timing_s/{p}", 0.0)) for r in rows) for p in PHASES}
    peak = max(float(r.get("perf/max_memory_allocated_gb", 0.0)) for r in rows) if device.type == "cuda" else None
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"variant": variant, "policy_params": params, "seconds": med,
            "step_without_gen_s": med["step"] - med["gen"], "gen_share": med["gen"] / med["step"],
            "peak_memory_gb": peak}


def to_markdown(report: dict) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [f"RLHF step on {env['device']} (torch {env['torch']}, transformers {env['transformers']}, git "
             f"{env['git_sha'][:12]}{' dirty' if env['git_dirty'] else ''}); policy {report['results'][0]['policy_params'] / 1e6:.1f}M "
             f"parameters, batch {cfg['batch']}, prompt {cfg['prompt_len']}, {cfg['new_tokens']} new tokens, "
             f"micro-batch {cfg['micro_batch']}, medians of {cfg['steps']} steps.", "",
             "| variant | step s | without gen s | gen share | " + " | ".join(PHASES[:-1]) + " | peak GB |",
             "|---|" + "---:|" * (len(PHASES) + 3)]
    for r in report["results"]:
        s = r["seconds"]
        peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {s['step']:.3f} | {r['step_without_gen_s']:.3f} | {r['gen_share']:.0%} | "
                     + " | ".join(f"{s[p]:.3f}" for p in PHASES[:-1]) + f" | {peak} |")
    lines += ["", "| ratio | memory | step | step without gen |", "|---|---:|---:|---:|"]
    for name, value in report["ratios"].items():
        lines.append(f"| {name} | " + " | ".join("n/a" if value[k] is None else f"{value[k]:.2f}"
                                                 for k in ("memory", "step", "without_gen")) + " |")
    return "\n".join(lines) + "\n"


def ratios(results: dict) -> dict:
    out = {}
    for base in ("ppo_unfused", "ppo_fused"):
        if "dvpo_fused" in results and base in results:
            a, b = results["dvpo_fused"], results[base]
            out[f"dvpo_fused / {base}"] = {
                "memory": a["peak_memory_gb"] / b["peak_memory_gb"] if b["peak_memory_gb"] else None,
                "step": a["seconds"]["step"] / b["seconds"]["step"],
                "without_gen": a["step_without_gen_s"] / b["step_without_gen_s"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer, hidden-64 model (script check)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--mini-batch", type=int, default=0, help="sequences per optimizer update (0 = the batch)")
    ap.add_argument("--engine", default="auto", choices=("auto", "eager", "cuda_graph", "hf"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        args.batch, args.prompt_len, args.new_tokens, args.micro_batch = min(args.batch, 8), 16, 16, 4
    results = {}
    for variant in args.variants:
        results[variant] = run_variant(variant, args, device)
        print(json.dumps(results[variant]), flush=True)
    report = {"environment": environment(device), "config": {k: v for k, v in vars(args).items() if k != "out"},
              "results": list(results.values()), "ratios": ratios(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device).replace(" ", "_")
    (args.out / f"rlhf_step_{tag}.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / f"rlhf_step_{tag}.md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
