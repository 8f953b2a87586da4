"""``python -m dvpo_kernels``: which backends can run here, and a self-check of every op.

Each op runs on random data through every available backend and is compared with the
float64 reference; one line per op and backend. ``--deps`` instead prints the installed
dependency versions against the declared floors and the newest tested (dvpo_kernels/_deps.py).
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import _backends, functional as F, reference as R


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _checks(dev):
    g = torch.Generator().manual_seed(0)
    n, h, v, b, t = 77, 48, 301, 3, 29
    f32 = dict(dtype=torch.float32)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, **f32).to(dev)

    hidden, weight, bias = rnd(n, h), rnd(v, h) * 0.2, rnd(v)
    tgt = torch.randint(0, v, (n,), generator=g).to(dev)
    mask = (torch.rand(n, generator=g) > 0.25).to(dev)
    ref_lp, ref_ent = R.linear_logprobs(hidden.cpu(), weight.cpu(), tgt.cpu(), bias.cpu(), 0.9)
    old = (ref_lp + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).float().to(dev)
    adv = rnd(n)
    loss_kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)

    def ll(be):
        lp, ent = F.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.9, return_entropy=True, backend=be)
        return max(_rel(lp, ref_lp), _rel(ent, ref_ent))

    def pl(be):
        loss, _ = F.policy_loss(ref_lp.float().to(dev), old, adv, mask, backend=be, **loss_kw)
        return _rel(loss, R.policy_loss(ref_lp, old.cpu(), adv.cpu(), mask.cpu(), **loss_kw))

    def fpl(be):
        loss, _ = F.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, temperature=0.9,
                                      backend=be, **loss_kw)
        return _rel(loss, R.policy_loss(ref_lp, old.cpu(), adv.cpu(), mask.cpu(), **loss_kw))

    vals, rew, m2 = rnd(b, t), rnd(b, t), (torch.rand(b, t, generator=g) > 0.3).to(dev)
    gh, vw = rnd(b, t, h), rnd(h)

    def vh(be):
        return _rel(F.value_head(hidden, vw, 0.5, backend=be), R.value_head(hidden.cpu(), vw.cpu(), 0.5))

    def gae(be):
        a, r = F.gae(vals, rew, m2, gamma=0.99, lam=0.9, backend=be)
        ra, rr = R.gae(vals.cpu(), rew.cpu(), m2.cpu(), 0.99, 0.9)
        return max(_rel(a, ra), _rel(r, rr))

    def wh(be):
        return _rel(F.masked_whiten(vals, m2, backend=be), R.masked_whiten(vals.cpu(), m2.cpu()))

    def da(be):
        out = F.dvpo_advantages(gh, vw, 0.1, m2, backend=be)
        return max(_rel(x, y) for x, y in zip(out, R.dvpo_advantages(gh.cpu(), vw.cpu(), 0.1, m2.cpu())))

    return [("linear_logprobs", "linear_logprobs", ll), ("policy_loss", "policy_loss", pl),
            ("fused_policy_loss", "fused_policy_loss", fpl), ("value_head", "value_head", vh),
            ("gae", "gae", gae), ("masked_whiten", "masked_whiten", wh),
            ("dvpo_advantages", "dvpo_advantages", da)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dvpo_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deps", action="store_true",
                        help="print installed dependency versions against the declared floors and the newest tested")
    if parser.parse_args(argv).deps:
        from . import _deps

        return _deps.main()
    import importlib.util

    tri = importlib.util.find_spec("triton")
    tri_version = "absent"
    if tri is not None:
        try:
            import triton

            tri_version = triton.__version__
        except Exception as e:  # a broken install should be reported, not crash the report
            tri_version = f"broken ({e})"
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    print(f"dvpo_kernels  python {platform.python_version()}  torch {torch.__version__}  triton {tri_version}")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu (no CUDA device)'}")
    print("backends:")
    for name, why in _backends.report(dev).items():
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")
    print(f"self-check on {dev.type}, fp32 inputs, max relative error against float64 (pass <= 2e-4):")
    failed = 0
    for label, op, fn in _checks(dev):
        for name in _backends.BACKENDS:
            if _backends.why_not(name, op, dev) is not None:
                continue
            err = fn(name)
            ok = err <= 2e-4
            failed += not ok
            print(f"  {label:<18} {name:<7} {err:.2e}  {'ok' if ok else 'FAIL'}")
    print("all ops ok" if not failed else f"{failed} check(s) FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
