"""Fused LM-head policy loss, forward+backward: time and extra memory of each provider against the
three-GEMM floor, eager PyTorch, torch.compile and Liger-Kernel, plus linear_logprobs without grad
against one GEMM.

Shapes: Qwen-like (N=8192, H=1536, V=151936) and Llama-3-8B-like (N=8192, H=4096, V=128256), bf16,
and a sweep of N at the Qwen shape. The loss is the token-mean clipped surrogate (clip 0.2) of
sequences of 1024 tokens with one advantage per sequence (what Liger's GRPO loss takes), every
token valid. Providers:

- ``floor``: the three GEMMs of forward+backward (logits, dH, dW; 6*N*H*V flop) with ``torch.mm``
- ``eager``: materialised logits, fp32 log_softmax, the loss, autograd
- ``compile``: ``torch.compile`` of the eager function
- ``liger``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (loss_type="bnpo", beta=0), if installed
- ``trl-chunked``: TRL's ``ChunkedLogProbFunction`` (the log-probs of its fused LM head), then the loss
- ``verl-torch``, ``verl-triton``: verl's ``FusedLinearForPPO`` (torch) and ``linear_cross_entropy``
  (Triton, CUDA only) log-probs and entropies, then the loss
- ``dvpo-torch``, ``dvpo-triton-speed``, ``dvpo-triton-lean``: ``dvpo_kernels.fused_policy_loss``

Each provider first passes a correctness gate (loss, dH and dW against the dvpo torch path, error
relative to the largest entry); then the median of ``triton.testing.do_bench`` after warm-up.
Memory is the peak allocated during one forward+backward minus what the inputs and the gradients
hold. Writes ``policy_loss_<device>.json`` / ``.md`` / ``.png`` under ``--out``.

    python benchmarks/bench_policy_loss.py            # CUDA device
    python benchmarks/bench_policy_loss.py --cpu      # tiny shapes, Triton interpreter: checks the script, not a result
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
from _report import git_state

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 1024
CLIP = 0.2
SHAPES = {"qwen": (8192, 1536, 151936), "llama3-8b": (8192, 4096, 128256)}
SWEEP_N = (1024, 2048, 4096, 8192, 16384, 32768)
CPU_SHAPES = {"tiny-a": (64, 32, 301), "tiny-b": (64, 48, 257)}
CPU_SWEEP_N = (32, 64, 128)
FUSED = ("dvpo-torch", "dvpo-triton-speed", "dvpo-triton-lean")
FRAMEWORKS = ("trl-chunked", "verl-torch", "verl-triton")
PROVIDERS = ("floor", "eager", "compile", "liger") + FRAMEWORKS + FUSED
FORWARD_PROVIDERS = ("gemm", "eager", "dvpo-torch", "dvpo-triton")


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


class Problem:
    """One shape's inputs: hidden [N, H] and weight [V, H] requiring grad, targets, and per-token
    old log-probs near the current ones (ratios around 1, some clipped), sequence advantages."""

    def __init__(self, n, h, v, dtype, device, dk):
        g = torch.Generator(device=device).manual_seed(0)
        seq = min(SEQ_LEN, n)
        self.n, self.h, self.v, self.seq = n, h, v, seq
        self.hidden = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
        self.weight = (torch.randn(v, h, device=device, generator=g) * (2.0 / h ** 0.5)).to(dtype).requires_grad_()
        self.tgt = torch.randint(0, v, (n,), device=device, generator=g)
        self.mask = torch.ones(n, dtype=torch.bool, device=device)
        self.seq_adv = torch.randn(n // seq, device=device, generator=g)
        self.adv = self.seq_adv.repeat_interleave(seq)
        with torch.no_grad():
            lp = dk.linear_logprobs(self.hidden, self.weight, self.tgt, backend="torch")
        self.old = lp + 0.2 * torch.randn(n, device=device, generator=g)
        self.grad_bytes = sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def eager_loss(hidden, weight, tgt, old, adv, mask):
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, tgt[:, None]).squeeze(1)
    return clipped_loss(logp, old, adv, mask)


def clipped_loss(logp, old, adv, mask):
    lr = (logp.float() - old).clamp(-20.0, 20.0)
    ratio = lr.exp()
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP))
    return torch.where(mask, loss, 0.0).sum() / mask.sum().clamp(min=1)


def make_providers(p: Problem, dk, device) -> dict:
    """name -> (step() returning (loss, dH, dW), or None with the reason it is skipped)."""
    args = (p.hidden, p.weight, p.tgt, p.old, p.adv, p.mask)

    def with_grads(loss):
        return (loss.detach(),) + torch.autograd.grad(loss, (p.hidden, p.weight))

    def fused(backend, memory):
        kw = dict(clip_low=CLIP, clip_high=CLIP, memory=memory, backend=backend)
        return lambda: with_grads(dk.fused_policy_loss(*args, **kw)[0])

    out = {
        "eager": (lambda: with_grads(eager_loss(*args)), None),
        "dvpo-torch": (fused("torch", "speed"), None),
        "dvpo-triton-speed": (fused("triton", "speed"), None),
        "dvpo-triton-lean": (fused("triton", "lean"), None),
    }
    compiled = torch.compile(eager_loss)
    out["compile"] = (lambda: with_grads(compiled(*args)), None)

    # The floor: the three GEMMs alone, outputs preallocated (the [N, V] operand of dH and dW included).
    with torch.no_grad():
        logits = torch.empty(p.n, p.v, dtype=p.hidden.dtype, device=device)
        dh = torch.empty_like(p.hidden)
        dw = torch.empty_like(p.weight)

    def floor():
        with torch.no_grad():
            torch.mm(p.hidden, p.weight.t(), out=logits)
            torch.mm(logits, p.weight, out=dh)
            torch.mm(logits.t(), p.hidden, out=dw)

    out["floor"] = (floor, None)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        out["liger"] = (None, f"liger-kernel not importable ({e})")
    else:
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP, epsilon_high=CLIP,
                                         loss_type="bnpo", temperature=1.0)
        b = p.n // p.seq

        def liger_step():
            res = liger(p.hidden.view(b, p.seq, p.h), p.weight, p.tgt.view(b, p.seq), p.mask.view(b, p.seq).int(),
                        p.seq_adv, old_per_token_logps=p.old.view(b, p.seq))
            return with_grads(res[0] if isinstance(res, tuple) else res)

        out["liger"] = (liger_step, None)
    out.update(framework_providers(p, device, with_grads))
    return out


def framework_providers(p: Problem, device, with_grads) -> dict:
    """The log-prob kernels TRL and verl ship, each followed by the same clipped loss; a framework that is
    not installed is skipped."""
    rest = (p.old, p.adv, p.mask)
    out = {}
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError as e:
        out["trl-chunked"] = (None, f"not installed (trl: {e})")
    else:
        def trl_step():
            logp = ChunkedLogProbFunction.apply(p.hidden, p.weight, None, p.tgt, 1.0, chunk, None, 1.0, ("log_probs",))[0]
            return with_grads(clipped_loss(logp, *rest))

        out["trl-chunked"] = (trl_step, None)
    try:
        from verl.utils.experimental.torch_functional import FusedLinearForPPO
    except ImportError as e:
        out["verl-torch"] = out["verl-triton"] = (None, f"not installed (verl: {e})")
        return out
    verl_torch = FusedLinearForPPO(impl_backend="torch")
    out["verl-torch"] = (lambda: with_grads(clipped_loss(verl_torch(p.hidden, p.weight, p.tgt)[0], *rest)), None)
    if device.type != "cuda":
        out["verl-triton"] = (None, "verl's Triton kernel needs CUDA")
        return out
    from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy

    out["verl-triton"] = (lambda: with_grads(clipped_loss(linear_cross_entropy(p.hidden, p.weight, p.tgt, 1.0, "none")[0],
                                                          *rest)), None)
    return out


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn, device, reps: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=100, rep=max(200, 50 * reps), return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def extra_gib(fn, device, held_bytes: int) -> float | None:
    """Peak allocated during one call, minus what was allocated before and ``held_bytes`` (its outputs)."""
    if device.type != "cuda":
        return None
    free_memory(device)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base - held_bytes) / 2**30


def run_one(name, step, skip, reference, p, device, reps, gate_tol) -> dict:
    row = dict(provider=name, ms=None, extra_gib=None, gate=None, status="ok")
    if step is None:
        row["status"] = f"skipped: {skip}"
        return row
    try:
        if name != "floor":  # correctness gate before any timing
            loss, dh, dw = step()
            errs = dict(loss=rel_err(loss, reference[0]), dh=rel_err(dh, reference[1]), dw=rel_err(dw, reference[2]))
            row["gate"] = errs
            del loss, dh, dw
            if max(errs.values()) > gate_tol:
                row["status"] = "failed the correctness gate"
                return row
        row["ms"] = time_ms(step, device, reps)
        row["extra_gib"] = None if name == "floor" else extra_gib(step, device, p.grad_bytes)
    except torch.OutOfMemoryError:
        row.update(status="out of memory", ms=None, extra_gib=None)
    finally:
        free_memory(device)
    return row


def bench_shape(label, n, h, v, dtype, device, dk, providers, reps, gate_tol) -> dict:
    p = Problem(n, h, v, dtype, device, dk)
    steps = make_providers(p, dk, device)
    reference = steps["dvpo-torch"][0]()
    # pop: a provider's buffers (the floor's [N, V] operand) go as soon as it has run
    rows = [run_one(name, *steps.pop(name), reference, p, device, reps, gate_tol) for name in providers]
    del reference
    free_memory(device)
    by = {r["provider"]: r for r in rows}
    for r in rows:
        for base in ("floor", "eager"):
            ok = r["ms"] is not None and base in by and by[base]["ms"] is not None
            r[f"x_{base}"] = r["ms"] / by[base]["ms"] if ok else None
    result = dict(label=label, n=n, h=h, v=v, flop=6 * n * h * v, rows=rows)
    result["forward"] = bench_forward(p, device, dk, reps) if label in SHAPES or label in CPU_SHAPES else None
    del p, steps
    free_memory(device)
    return result


def bench_forward(p: Problem, device, dk, reps) -> list:
    """linear_logprobs without grad (old/ref log-probs) against one GEMM into a preallocated output."""
    out = torch.empty(p.n, p.v, dtype=p.hidden.dtype, device=device)
    fns = {
        "gemm": lambda: torch.mm(p.hidden, p.weight.t(), out=out),
        "eager": lambda: torch.log_softmax((p.hidden @ p.weight.t()).float(), -1).gather(1, p.tgt[:, None]),
        "dvpo-torch": lambda: dk.linear_logprobs(p.hidden, p.weight, p.tgt, backend="torch"),
        "dvpo-triton": lambda: dk.linear_logprobs(p.hidden, p.weight, p.tgt, backend="triton"),
    }
    rows = []
    with torch.no_grad():
        want = fns["dvpo-torch"]()
        err = rel_err(fns["dvpo-triton"](), want)
        for name in FORWARD_PROVIDERS:
            row = dict(provider=name, ms=None, extra_gib=None, status="ok")
            if name == "dvpo-triton" and err > 1e-2:
                row["status"] = f"failed the correctness gate ({err:.2e})"
            else:
                try:
                    row["ms"] = time_ms(fns[name], device, reps)
                    row["extra_gib"] = None if name == "gemm" else extra_gib(fns[name], device, p.n * 4)
                except torch.OutOfMemoryError:
                    row["status"] = "out of memory"
            rows.append(row)
            free_memory(device)
    del out
    gemm = rows[0]["ms"]
    for r in rows:
        r["x_gemm"] = r["ms"] / gemm if r["ms"] is not None and gemm else None
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def to_markdown(report) -> str:
    lines = [f"# Fused policy loss on {report['device']}", "",
             f"{report['dtype']}, token-mean clipped loss, every token valid; torch {report['torch']}, "
             f"triton {report['triton']}, git {report['git_sha'][:12]}{' (dirty)' if report['git_dirty'] else ''}. "
             "Forward+backward; extra GiB = peak minus inputs and gradients; gate = max relative error of "
             "loss/dH/dW against the dvpo torch path.", ""]
    for res in report["results"]:
        lines += [f"## {res['label']}: N={res['n']}, H={res['h']}, V={res['v']} "
                  f"({res['flop'] / 1e12:.1f} TFLOP)", "",
                  "| provider | ms | x floor | x eager | extra GiB | gate | status |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            gate = "-" if r["gate"] is None else f"{max(r['gate'].values()):.1e}"
            lines.append(f"| {r['provider']} | {_fmt(r['ms'], '.2f')} | {_fmt(r['x_floor'], '.2f')} | "
                         f"{_fmt(r['x_eager'], '.2f')} | {_fmt(r['extra_gib'], '.2f')} | {gate} | {r['status']} |")
        if res["forward"]:
            lines += ["", "linear_logprobs without grad:", "", "| provider | ms | x one GEMM | extra GiB | status |",
                      "|---|---:|---:|---:|---|"]
            for r in res["forward"]:
                lines.append(f"| {r['provider']} | {_fmt(r['ms'], '.2f')} | {_fmt(r['x_gemm'], '.2f')} | "
                             f"{_fmt(r['extra_gib'], '.2f')} | {r['status']} |")
        lines.append("")
    return "\n".join(lines)


def plot(report, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in report["results"] if r["label"].startswith("sweep")]
    if not sweep:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in report["providers"]:
        pts = [(res["n"], row) for res in sweep for row in res["rows"] if row["provider"] == name]
        t = [(n, r["ms"]) for n, r in pts if r["ms"] is not None]
        m = [(n, r["extra_gib"]) for n, r in pts if r["extra_gib"] is not None]
        if t:
            ax_t.plot(*zip(*t), marker="o", label=name)
        if m:
            ax_m.plot(*zip(*m), marker="o", label=name)
    shape = sweep[0]
    for ax, ylabel in ((ax_t, "forward+backward ms"), (ax_m, "extra memory GiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    ax_t.set_yscale("log")
    ax_t.legend(fontsize=8)
    fig.suptitle(f"{report['device']}, {report['dtype']}, H={shape['h']}, V={shape['v']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU (checks the script; not a result)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--no-sweep", action="store_true", help="only the two fixed shapes")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--gate-tol", type=float, default=2e-2, help="max relative error of loss/dH/dW")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.cpu:
        # CPU tensors reach the Triton kernels only through the interpreter, which must be on before
        # triton is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device; use --cpu for the tiny check")
    import triton

    import dvpo_kernels as dk

    device = torch.device("cpu" if args.cpu else "cuda")
    dtype = torch.float32 if args.cpu else torch.bfloat16
    shapes = CPU_SHAPES if args.cpu else SHAPES
    first = next(iter(shapes.values()))
    jobs = [(label, *shape) for label, shape in shapes.items()]
    if not args.no_sweep:
        jobs += [(f"sweep N={n}", n, first[1], first[2]) for n in (CPU_SWEEP_N if args.cpu else SWEEP_N)]
    results = []
    for label, n, h, v in jobs:
        res = bench_shape(label, n, h, v, dtype, device, dk, args.providers, args.reps, args.gate_tol)
        results.append(res)
        for r in res["rows"]:
            print(f"{label:>14} {r['provider']:>18}: {_fmt(r['ms'], '9.2f')} ms  x floor {_fmt(r['x_floor'], '5.2f')}"
                  f"  extra {_fmt(r['extra_gib'], '6.2f')} GiB  {r['status']}")
        for r in res["forward"] or []:
            print(f"{label:>14} {'fwd ' + r['provider']:>18}: {_fmt(r['ms'], '9.2f')} ms  x gemm "
                  f"{_fmt(r['x_gemm'], '5.2f')}  {r['status']}")

    sha, dirty = git_state()
    report = dict(
        benchmark="policy_loss",
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny check, not a result)",
        torch=torch.__version__, triton=triton.__version__, git_sha=sha, git_dirty=dirty,
        dtype=str(dtype).removeprefix("torch."), clip=CLIP, seq_len=SEQ_LEN, providers=args.providers,
        results=results,
    )
    slug = "cpu-tiny" if args.cpu else re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"policy_loss_{slug}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    plotted = plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md{', .png' if plotted else ' (no plot: matplotlib missing)'}")


if __name__ == "__main__":
    main()
