"""Rollout throughput: transformers ``generate`` against the dvpo rollout engines (eager loop, CUDA graph).

A Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads / 2 KV heads, intermediate 4864, vocab 151936,
tied embeddings, bf16) with random weights; 32 left-padded prompts of 96-128 tokens; 256 new tokens,
greedy, EOS disabled so that every engine produces the same number of tokens.

Per engine: the first call (CUDA-graph capture included), then the median of ``--repeats`` calls; prefill
is timed alone (one new token) so that ``ms_per_decode_step = (total - prefill) / (new_tokens - 1)``.
Correctness gate before timing: the CUDA-graph engine must reproduce the eager loop token for token (64 new
tokens); the full timed runs are compared again and reported.
Writes ``generation_<device>.json`` and ``.md`` under ``--out``.

    python benchmarks/bench_generation.py            # GPU, the shapes above
    python benchmarks/bench_generation.py --cpu      # tiny model on the CPU: checks the script, not a result
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
from _report import git_state
import transformers

from dvpo.rollout import RolloutEngine, generate

REPO = Path(__file__).resolve().parents[1]
PAD = 0

FULL = dict(
    model=dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    dtype=torch.bfloat16,
    batch=32,
    prompt_len=128,
    new_tokens=256,
)
TINY = dict(
    model=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=True,
    ),
    dtype=torch.float32,
    batch=4,
    prompt_len=16,
    new_tokens=16,
)


def build_model(shape: dict, dtype: torch.dtype, device: torch.device):
    config = transformers.Qwen2Config(**shape)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval()


def make_prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(prompt_len * 3 // 4, prompt_len + 1, (batch,), generator=g)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() for n in lengths]


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def bench_engine(model, name, prompts, new_tokens, repeats, device) -> tuple[dict, torch.Tensor]:
    kw = dict(max_new_tokens=new_tokens, pad_token_id=PAD, eos_token_id=None, do_sample=False)
    prefill = RolloutEngine(model, "eager" if name == "cuda_graph" else name)  # prefill is the same eager forward
    prefill_s = statistics.median(
        timed(lambda: prefill.generate(prompts, **{**kw, "max_new_tokens": 1}), device)[0] for _ in range(repeats)
    )
    prefill.release()

    engine = RolloutEngine(model, name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    first_s, rollout = timed(lambda: engine.generate(prompts, **kw), device)
    times = [timed(lambda: engine.generate(prompts, **kw), device)[0] for _ in range(repeats)]
    peak_gib = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    engine.release()

    total = statistics.median(times)
    generated = int(rollout.response_lengths.sum())
    return (
        dict(
            engine=name,
            tokens_per_s=generated / total,
            seconds=total,
            seconds_all=times,
            first_call_s=first_s,
            prefill_ms=prefill_s * 1e3,
            ms_per_decode_step=(total - prefill_s) / max(new_tokens - 1, 1) * 1e3,
            generated_tokens=generated,
            peak_gib=peak_gib,
        ),
        rollout.sequences,
    )


def to_markdown(report: dict) -> str:
    lines = [
        f"# Rollout generation on {report['device']}",
        "",
        f"Qwen2-shaped model, {report['params_m']:.1f}M parameters, {report['dtype']}; batch {report['batch']}, "
        f"prompts {report['prompt_lens'][0]}-{report['prompt_lens'][1]} tokens (left-padded), "
        f"{report['new_tokens']} new tokens, greedy, EOS disabled. torch {report['torch']}, "
        f"transformers {report['transformers']}, git {report['git_sha'][:12]}"
        f"{' (dirty)' if report['git_dirty'] else ''}.",
        "",
        "| engine | tokens/s | x HF generate | total s | first call s | prefill ms | ms / decode step | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(
            f"| {r['engine']} | {r['tokens_per_s']:,.0f} | {r['speedup_vs_hf']:.1f} | {r['seconds']:.3f} | "
            f"{r['first_call_s']:.3f} | {r['prefill_ms']:.1f} | {r['ms_per_decode_step']:.2f} | {peak} |"
        )
    checks = report["checks"]
    lines += [
        "",
        f"cuda_graph == eager token for token: {checks.get('cuda_graph_equals_eager', 'not run')}; "
        f"rows identical to HF generate: {checks['rows_equal_to_hf']:.0%} "
        "(random weights give near-tied logits, so different attention kernels may pick different argmaxes).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny model on the CPU (checks the script; not a result)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    setup = TINY if args.cpu else FULL
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device; use --cpu for the tiny check")
    device = torch.device("cpu" if args.cpu else "cuda")
    batch = args.batch or setup["batch"]
    prompt_len = args.prompt_len or setup["prompt_len"]
    new_tokens = args.new_tokens or setup["new_tokens"]

    model = build_model(setup["model"], setup["dtype"], device)
    prompts = make_prompts(batch, prompt_len, setup["model"]["vocab_size"])
    engines = ["hf", "eager"] + (["cuda_graph"] if device.type == "cuda" else [])

    if "cuda_graph" in engines:  # correctness gate before any timing
        gate = dict(max_new_tokens=min(new_tokens, 64), pad_token_id=PAD, do_sample=False)
        eager = generate(model, prompts, engine="eager", **gate).sequences
        if not torch.equal(generate(model, prompts, engine="cuda_graph", **gate).sequences, eager):
            raise SystemExit("correctness gate failed: the CUDA-graph engine differs from the eager loop")

    results, sequences = [], {}
    for name in engines:
        result, sequences[name] = bench_engine(model, name, prompts, new_tokens, args.repeats, device)
        results.append(result)
        print(f"{name:>10}: {result['tokens_per_s']:10,.0f} tokens/s  {result['ms_per_decode_step']:7.2f} ms/step")

    checks = {"rows_equal_to_hf": float((sequences["eager"] == sequences["hf"]).all(dim=1).float().mean())}
    if "cuda_graph" in sequences:
        checks["cuda_graph_equals_eager"] = bool(torch.equal(sequences["cuda_graph"], sequences["eager"]))
    hf_rate = results[0]["tokens_per_s"]
    for r in results:
        r["speedup_vs_hf"] = r["tokens_per_s"] / hf_rate

    sha, dirty = git_state()
    report = dict(
        benchmark="generation",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny check, not a result)",
        torch=torch.__version__,
        transformers=transformers.__version__,
        git_sha=sha,
        git_dirty=dirty,
        model=setup["model"],
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        dtype=str(setup["dtype"]).removeprefix("torch."),
        batch=batch,
        prompt_lens=[min(map(len, prompts)), max(map(len, prompts))],
        new_tokens=new_tokens,
        repeats=args.repeats,
        results=results,
        checks=checks,
    )
    slug = "cpu-tiny" if args.cpu else re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"generation_{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"generation_{slug}.md").write_text(to_markdown(report))
    print(f"wrote {args.out / f'generation_{slug}.json'} and .md")


if __name__ == "__main__":
    main()
