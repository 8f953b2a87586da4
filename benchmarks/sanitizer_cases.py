"""Small cases of every native and Triton kernel, for compute-sanitizer (memcheck, racecheck).

Each case runs one op, forward and backward, on a forced backend, over odd shapes that span several
row blocks and vocab slices, with Hugging Face's -100 at masked targets (defect 4 of issue 13), and
compares it with the float64 reference on the CPU: a run under the sanitizer then fails on wrong
numbers as well as on bad accesses. The references run on the CPU so that the sanitizer spends its
time on our kernels, not on cuBLAS. Exit status 1 when a case is wrong or its backend cannot run.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitizer_cases.py
    python benchmarks/sanitizer_cases.py --cpu     # the same cases: C++ twins and the Triton interpreter

``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` gives every tensor its own allocation, so an out-of-bounds read
lands outside any allocation instead of inside a pooled block where memcheck cannot see it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

N, H, V = 37, 48, 301  # V divides no block or vocab slice; N spans several row blocks
B, T = 3, 29
OPS = ("linear_logprobs", "fused_policy_loss", "policy_loss", "value_head", "gae", "masked_whiten",
       "dvpo_advantages")
BACKENDS = ("native", "triton")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel_err(got, want) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))


def worst(got, want) -> float:
    return max(rel_err(g, w) for g, w in zip(got, want))


class Inputs:
    """float64 CPU originals and their copies on the device in ``dtype`` (leaves that need grad)."""

    def __init__(self, dev, dtype, seed=0):
        g = torch.Generator().manual_seed(seed)
        f64 = dict(generator=g, dtype=torch.float64)
        self.dev, self.dtype = dev, dtype
        self.mask = torch.rand(N, generator=g) > 0.3
        self.tgt = torch.randint(0, V, (N,), generator=g)
        self.old = -torch.rand(N, **f64) * 3
        self.adv = torch.randn(N, **f64)
        self.ref = -torch.rand(N, **f64) * 3
        # rounded to dtype first, so the reference sees exactly what the kernel sees
        self.lm = [x.to(dtype).double() for x in (torch.randn(N, H, **f64), torch.randn(V, H, **f64) * 2 / H ** 0.5,
                                                  torch.randn(V, **f64))]
        self.m2 = torch.rand(B, T, generator=g) > 0.3
        self.m2[1] = False  # a row with no valid token
        self.values, self.rewards = torch.randn(B, T, **f64), torch.randn(B, T, **f64)
        self.gvm = torch.randn(B, T, H, **f64).to(dtype).double()
        self.vw = torch.randn(H, **f64) / H ** 0.5
        self.old2, self.ref2 = -torch.rand(B, T, **f64) * 3, -torch.rand(B, T, **f64) * 3
        self.score = torch.randn(B, **f64)

    def on_dev(self, t, dtype=None, grad=False):
        return t.to(self.dev, dtype or (self.dtype if t.is_floating_point() else t.dtype)).requires_grad_(grad)

    def f32(self, t):
        return self.on_dev(t, torch.float32)


def linear_logprobs(x: Inputs, backend: str, memory: str) -> float:
    ref = [t.clone().requires_grad_() for t in x.lm]
    args = [x.on_dev(t, grad=True) for t in x.lm]
    g1, g2 = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    import dvpo_kernels as dk
    from dvpo_kernels import reference as R

    lp, ent = dk.linear_logprobs(args[0], args[1], x.on_dev(x.tgt), bias=args[2], temperature=0.9,
                                 return_entropy=True, memory=memory, backend=backend)
    got = [lp, ent, *torch.autograd.grad((lp * x.f32(g1)).sum() + (ent * x.f32(g2)).sum(), args)]
    rlp, rent = R.linear_logprobs(ref[0], ref[1], x.tgt, ref[2], 0.9)
    want = [rlp, rent, *torch.autograd.grad((rlp * g1).sum() + (rent * g2).sum(), ref)]
    return worst(got, want)


def fused_policy_loss(x: Inputs, backend: str, memory: str) -> float:
    import dvpo_kernels as dk
    from dvpo_kernels import reference as R

    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.1, entropy_coef=0.01)
    tgt = torch.where(x.mask, x.tgt, -100)  # masked targets must never be read
    ref = [t.clone().requires_grad_() for t in x.lm]
    args = [x.on_dev(t, grad=True) for t in x.lm]
    loss, _ = dk.fused_policy_loss(args[0], args[1], x.on_dev(tgt), x.f32(x.old), x.f32(x.adv), x.on_dev(x.mask),
                                   bias=args[2], temperature=0.9, ref_logprobs=x.f32(x.ref), memory=memory,
                                   backend=backend, **kw)
    got = [loss, *torch.autograd.grad(loss, args)]
    rlp, rent = R.linear_logprobs(ref[0], ref[1], tgt, ref[2], 0.9, mask=x.mask)
    want_loss = R.policy_loss(rlp, x.old, x.adv, x.mask, ref=x.ref, entropy=rent, **kw)
    want = [want_loss, *torch.autograd.grad(want_loss, ref)]
    return worst(got, want)


def policy_loss(x: Inputs, backend: str) -> float:
    import dvpo_kernels as dk
    from dvpo_kernels import reference as R

    kw = dict(clip_high=0.28, dual_clip=3.0, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    logp64 = (x.old2 + 0.2 * x.values).requires_grad_()
    logp = x.f32(logp64.detach()).requires_grad_()
    loss, _ = dk.policy_loss(logp, x.f32(x.old2), x.f32(x.rewards), x.on_dev(x.m2), ref_logprobs=x.f32(x.ref2),
                             backend=backend, **kw)
    want = R.policy_loss(logp64, x.old2, x.rewards, x.m2, ref=x.ref2, **kw)
    return worst([loss, *torch.autograd.grad(loss, logp)], [want, *torch.autograd.grad(want, logp64)])


def advantage_op(x: Inputs, backend: str, op: str) -> float:
    import dvpo_kernels as dk
    from dvpo_kernels import reference as R

    m = x.on_dev(x.m2)
    if op == "value_head":
        return rel_err(dk.value_head(x.on_dev(x.gvm), x.f32(x.vw), 0.5, backend=backend),
                       R.value_head(x.gvm, x.vw, 0.5))
    if op == "gae":
        got = dk.gae(x.f32(x.values), x.f32(x.rewards), m, gamma=0.99, lam=0.9, backend=backend)
        return worst(got, R.gae(x.values, x.rewards, x.m2, 0.99, 0.9))
    if op == "masked_whiten":
        return rel_err(dk.masked_whiten(x.f32(x.values), m, backend=backend), R.masked_whiten(x.values, x.m2))
    got = dk.dvpo_advantages(x.on_dev(x.gvm), x.f32(x.vw), 0.1, m, old_logprobs=x.f32(x.old2),
                             ref_logprobs=x.f32(x.ref2), kl_coef=0.05, score=x.f32(x.score), backend=backend)
    want = R.dvpo_advantages(x.gvm, x.vw, 0.1, x.m2, old_logprobs=x.old2, ref_logprobs=x.ref2, kl_coef=0.05,
                             score=x.score)
    return worst(got, want)


def cases(backend: str):
    """(label, dtype, fn(inputs) -> max relative error) for every op the backend has kernels for."""
    have = importlib.import_module(f"dvpo_kernels.{backend}_backend").OPS
    out = []
    for op in (op for op in OPS if op in have):
        if op in ("linear_logprobs", "fused_policy_loss"):
            fn = linear_logprobs if op == "linear_logprobs" else fused_policy_loss
            for memory in ("speed", "lean"):
                for dtype in (torch.float32, torch.bfloat16):
                    out.append((f"{op}[{memory}]", dtype, lambda x, fn=fn, m=memory: fn(x, backend, m)))
        elif op == "policy_loss":
            out.append((op, torch.float32, lambda x: policy_loss(x, backend)))
        else:
            dtypes = (torch.float32, torch.bfloat16) if op in ("value_head", "dvpo_advantages") else (torch.float32,)
            out += [(op, dtype, lambda x, op=op: advantage_op(x, backend, op)) for dtype in dtypes]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU tensors: the C++ twins and the Triton interpreter")
    ap.add_argument("--backends", default="native,triton", help="comma-separated, from: native, triton")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        ap.error(f"--backends: unknown backend(s) {unknown}; choose from {list(BACKENDS)}")
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        ap.error("no CUDA device; use --cpu to run the cases on CPU tensors")
    os.environ.setdefault("DVPO_KERNELS_LEAN_VOCAB_SLICE", "61")  # several vocab slices in lean mode
    import dvpo_kernels as dk

    dk.set_max_block_elements(2000)  # several row blocks at N=37
    dev = torch.device("cpu" if args.cpu else "cuda")
    failed = 0
    for backend in backends:
        for label, dtype, fn in cases(backend):
            name = f"{backend:<7}{label:<26}{str(dtype).removeprefix('torch.'):<9}"
            try:
                err = fn(Inputs(dev, dtype))
            except Exception as e:  # a backend that cannot run here, or a crash in a kernel
                failed += 1
                print(f"{name} FAIL {type(e).__name__}: {e}", flush=True)
                continue
            ok = err <= TOL[dtype]
            failed += not ok
            print(f"{name} {err:.1e} {'ok' if ok else 'FAIL'}", flush=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()  # an asynchronous fault surfaces at its own case
    print("all cases ok" if not failed else f"{failed} case(s) FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
