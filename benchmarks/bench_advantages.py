"""DVPO advantages: the masked reverse GAE scan alone, and the whole recipe with the value head.

Inputs per shape: bf16 ``gvm_hidden [B, T, 1536]``, rows of different lengths (right padding,
lengths uniform in [T/4, T]), fp32 old/ref log-probs (KL reward, kl_coef=0.05), a score per row,
gamma=1, lam=0.95, per-row value whitening, whitened advantages (the DVPO recipe).

Variants, on the same inputs:
- ``loop``: GAE as trainers write it (verl / OpenRLHF ``compute_gae_advantage_return``):
  ``for t in reversed(range(T))`` over whole-batch slices, masked positions carrying the next
  value and advantage (verl's multi-turn form); for the full recipe, a bf16 value head and
  framework-style masked whitening around it.
- every dvpo_kernels backend that can run here: ``native`` (csrc/), ``triton``, ``torch``.

``scan`` times ``gae(values, rewards, mask)``; ``full`` times ``dvpo_advantages`` (projection,
value whitening, rewards, scan, advantage whitening). Floors: the bytes each must move, at the
copy bandwidth measured in the same run (``torch.empty_like(x).copy_(x)`` of gvm_hidden's bytes;
bandwidth = 2 * bytes / time): ``full`` reads gvm_hidden once; ``scan`` reads values, rewards and
mask and writes advantages and returns (17 bytes per token).

Correctness gate before timing: every variant against the float64 torch backend.
Timing: CUDA events, median after warm-up (perf_counter on the CPU). Writes
``advantages_<device>.json`` and ``.md`` under ``--out``.

    python benchmarks/bench_advantages.py            # GPU: B x T in {64x2048, 256x4096, 16x32768}, H=1536
    python benchmarks/bench_advantages.py --cpu      # small shapes on the CPU: checks the script, not a result
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

import dvpo_kernels as dk
from dvpo_kernels import _backends

REPO = Path(__file__).resolve().parents[1]
GPU_SHAPES = ((64, 2048), (256, 4096), (16, 32768))
CPU_SHAPES = ((4, 256), (16, 512), (2, 4096))
GAMMA, LAM, KL = 1.0, 0.95, 0.05
SCAN_BYTES_PER_TOKEN = 4 + 4 + 1 + 4 + 4  # values, rewards, mask in; advantages, returns out
GRAPH_VARIANTS = ("native", "triton")
GATE = {"scan": 1e-4, "full": 1e-3, "loop_full": 5e-2}  # loop_full: its value head rounds to bf16


# --- the loop trainers write -----------------------------------------------------------------

def loop_gae(values, rewards, mask, gamma, lam):
    b, t = values.shape
    m = mask.to(values.dtype)
    nextvalues = torch.zeros(b, dtype=values.dtype, device=values.device)
    lastgaelam = torch.zeros_like(nextvalues)
    advantages_reversed = []
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * nextvalues - values[:, i]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, i] * m[:, i] + (1 - m[:, i]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, i] + (1 - m[:, i]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages * m, returns * m


def loop_whiten(x, m, dim=None):
    kw = {} if dim is None else {"dim": dim, "keepdim": True}
    count = m.sum(**kw)
    mean = (x * m).sum(**kw) / count.clamp(min=1)
    var = ((x - mean) ** 2 * m).sum(**kw) / (count - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + 1e-8) * m


def loop_dvpo(hidden, weight, mask, old, ref, score, lengths):
    m = mask.float()
    values = (hidden @ weight).float()  # the critic's value head in bf16
    values = loop_whiten(values, m, dim=1)
    rewards = -KL * (old - ref) * m
    rewards[torch.arange(len(lengths), device=rewards.device), lengths - 1] += score  # right padding
    adv, ret = loop_gae(values, rewards, mask, GAMMA, LAM)
    return loop_whiten(adv, m), ret, values


# --- timing ------------------------------------------------------------------------------------

def bench_us(fn, device: torch.device, budget_s: float) -> float:
    """Median time of fn in microseconds, after warm-up."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    est = time.perf_counter() - t0
    for _ in range(3 if est < 0.05 else 0):
        fn()
    sync()
    reps = int(min(200, max(5, budget_s / max(est, 1e-6))))
    times = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        sync()
        times = [start.elapsed_time(end) * 1e3 for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def cuda_graph(fn):
    """fn captured in a CUDA graph: its replay times the kernels without Python dispatch."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rel_err(got, want, mask) -> float:
    got, want = got.double()[mask], want.double()[mask]
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12)) if want.numel() else 0.0


# --- one shape ---------------------------------------------------------------------------------

def make_inputs(b, t, h, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, t // 4), t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(h, generator=g) / h ** 0.5).to(torch.bfloat16)
    old = -torch.rand(b, t, generator=g) * 3
    ref = old + 0.1 * torch.randn(b, t, generator=g)
    score = torch.randn(b, generator=g)
    values = torch.randn(b, t, generator=g)
    rewards = torch.where(mask, 0.01 * torch.randn(b, t, generator=g), 0.0)
    out = dict(hidden=hidden, weight=weight, mask=mask, old=old, ref=ref, score=score, values=values,
               rewards=rewards, lengths=lengths)
    return {k: v.to(device) for k, v in out.items()}


def run_shape(b, t, h, device, budget_s, log):
    x = make_inputs(b, t, h, device)
    mask = x["mask"]
    backends = [n for n in _backends.BACKENDS
                if not (n == "triton" and device.type != "cuda")  # the interpreter is no benchmark
                and _backends.why_not(n, "dvpo_advantages", device) is None]
    adv_kw = dict(old_logprobs=x["old"], ref_logprobs=x["ref"], kl_coef=KL, score=x["score"], gamma=GAMMA, lam=LAM)

    scan = {"loop": lambda: loop_gae(x["values"], x["rewards"], mask, GAMMA, LAM)}
    full = {"loop": lambda: loop_dvpo(x["hidden"], x["weight"], mask, x["old"], x["ref"], x["score"], x["lengths"])}
    for name in backends:
        scan[name] = lambda name=name: dk.gae(x["values"], x["rewards"], mask, gamma=GAMMA, lam=LAM, backend=name)
        full[name] = lambda name=name: dk.dvpo_advantages(x["hidden"], x["weight"], None, mask, backend=name,
                                                          **adv_kw)

    # Correctness gate: float64 torch backend on the same (bf16-rounded) inputs.
    d = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    want_scan = dk.gae(d["values"], d["rewards"], mask, gamma=GAMMA, lam=LAM, backend="torch")
    want_full = dk.dvpo_advantages(d["hidden"], d["weight"], None, mask, backend="torch",
                                   **{**adv_kw, "old_logprobs": d["old"], "ref_logprobs": d["ref"],
                                      "score": d["score"]})
    del d
    for kind, fns, want in (("scan", scan, want_scan), ("full", full, want_full)):
        for name, fn in fns.items():
            tol = GATE["loop_full" if (kind, name) == ("full", "loop") else kind]
            err = max(rel_err(g, w, mask) for g, w in zip(fn(), want))
            if err > tol:
                raise SystemExit(f"correctness gate failed: {kind} {name} at B={b} T={t}: rel err {err:.2e} > {tol}")
            log(f"  gate {kind:<4} {name:<6} rel err {err:.1e}")
    del want_scan, want_full

    nbytes = x["hidden"].numel() * x["hidden"].element_size()
    valid_bytes = int(mask.sum()) * h * x["hidden"].element_size()
    copy_us = bench_us(lambda: torch.empty_like(x["hidden"]).copy_(x["hidden"]), device, budget_s)
    bw = 2 * nbytes / (copy_us * 1e-6)
    row = dict(B=b, T=t, H=h, hidden_bytes=nbytes, valid_fraction=valid_bytes / nbytes,
               copy_bandwidth_GBps=bw / 1e9,
               floor_us={"full": nbytes / bw * 1e6, "full_valid": valid_bytes / bw * 1e6,
                         "scan": b * t * SCAN_BYTES_PER_TOKEN / bw * 1e6},
               us={"scan": {}, "full": {}})
    for kind, fns in (("scan", scan), ("full", full)):
        if device.type == "cuda":  # kernel time alone, for the compiled backends
            fns.update({f"{n}:graph": cuda_graph(fns[n]) for n in GRAPH_VARIANTS if n in fns})
        for name, fn in fns.items():
            row["us"][kind][name] = bench_us(fn, device, budget_s)
            log(f"  {kind:<4} {name:<12} {row['us'][kind][name]:12.1f} us")
    return row, backends


def markdown(meta, rows, variants) -> str:
    head = (["B x T", "op"] + [f"{v} (us)" for v in variants]
            + ["floor (us)", "floor, valid rows (us)", "best / floor", "loop / best"])
    how = ("median of CUDA-event timings after warm-up; `:graph` = CUDA-graph replay (kernels without Python "
           "dispatch)" if meta["device_type"] == "cuda" else "CPU run: checks the script, not a GPU result")
    dirty = " (dirty)" if meta["git_dirty"] else ""
    lines = [f"# DVPO advantages on {meta['device']}", "",
             f"hidden {meta['hidden_dtype']} H={rows[0]['H']}; torch {meta['torch']}; git {meta['git_sha'][:12]}{dirty}; "
             f"{how}.", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for kind in ("scan", "full"):
            us, floor = r["us"][kind], r["floor_us"][kind]
            best = min(v for k, v in us.items() if k != "loop")
            cells = [f"{r['B']} x {r['T']}", kind] + [f"{us[v]:.1f}" if v in us else "-" for v in variants]
            cells += [f"{floor:.1f}", f"{r['floor_us']['full_valid']:.1f}" if kind == "full" else "-",
                      f"{best / floor:.2f}", f"{us['loop'] / best:.0f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "floor: bytes moved at the copy bandwidth measured in the same run (full: all of gvm_hidden "
              "read once; valid rows: only the rows of valid tokens, which is all the native kernel reads; "
              "scan: 17 bytes per token)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="small shapes on the CPU (checks the script)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 1536; 64 with --cpu)")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of timed repetitions per variant")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args()

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu to check the script on small shapes")
    device = torch.device("cpu" if args.cpu else "cuda")
    shapes, h = (CPU_SHAPES, args.hidden or 64) if args.cpu else (GPU_SHAPES, args.hidden or 1536)
    name = "cpu" if args.cpu else torch.cuda.get_device_name()
    sha, dirty = git_state()
    meta = dict(device=name, device_type=device.type, torch=torch.__version__, git_sha=sha, git_dirty=dirty,
                hidden_dtype="bfloat16", values_dtype="float32", gamma=GAMMA, lam=LAM, kl_coef=KL,
                value_norm="seq", whiten_advantages=True,
                unavailable={n: why for n, why in dk.backend_report(device).items() if why is not None})
    print(f"dvpo advantages benchmark on {name}, torch {torch.__version__}")
    rows, variants = [], ["loop"]
    for b, t in shapes:
        print(f"B={b} T={t} H={h}")
        row, backends = run_shape(b, t, h, device, args.budget, print)
        rows.append(row)
        variants += [n for n in row["us"]["full"] if n not in variants]
        if device.type == "cuda":
            torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stem = args.out / f"advantages_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, results=rows), indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows, variants))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
