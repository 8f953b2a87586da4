"""Float hyper-parameters reach the Triton kernels as fp64 launch arguments.

Triton types an unannotated Python float argument as fp32, so an fp64 kernel would see the
temperature and the clip bounds rounded to fp32. Every float argument of every launch the ops
make must land in a parameter annotated ``tl.float64`` (the kernels round it once to their
stat dtype). On the CPU the launches are recorded under the interpreter; ``-m gpu`` checks the
compiled kernels' fp64 results.
"""
import inspect

import pytest
import torch

import dvpo_kernels as dk

from _helpers import make_lm_inputs, make_token_inputs, rel_err

pytest.importorskip("dvpo_kernels.triton_backend")
import triton.language as tl  # noqa: E402

from dvpo_kernels.triton_backend import row_kernels  # noqa: E402

pytestmark = pytest.mark.triton

OPTIONS = dict(temperature=0.7, clip_low=0.1, clip_high=0.13, dual_clip=3.1, kl_coef=0.1, entropy_coef=0.01)


def _run_every_kernel(backend="triton", device="cpu"):
    hidden, weight, bias, tgt = make_lm_inputs(9, 24, 53, device=device)
    old, adv, mask, ref = make_token_inputs((9,), device=device)
    out = []
    for memory in ("speed", "lean"):
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.7, return_entropy=True,
                                     memory=memory, backend=backend)
        out += [lp, ent, *torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight, bias))]
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, ref_logprobs=ref,
                                       memory=memory, backend=backend, **OPTIONS)
        out += [loss, *torch.autograd.grad(loss, (hidden, weight, bias))]
    kw = {k: v for k, v in OPTIONS.items() if k != "temperature"}
    lp = lp.detach().requires_grad_()
    loss, _ = dk.policy_loss(lp, old, adv, mask, ref_logprobs=ref, entropy=ent.detach(), backend=backend, **kw)
    return out + [loss, *torch.autograd.grad(loss, lp)]


def test_every_float_launch_argument_is_an_fp64_parameter(monkeypatch):
    from triton.runtime import interpreter

    if not isinstance(row_kernels.logprob_rows_kernel, interpreter.InterpretedFunction):
        pytest.skip("records launches under the Triton interpreter")
    launches = []
    real_call = interpreter.GridExecutor.__call__

    def record(self, *args, **kwargs):
        sig = inspect.signature(self.fn)
        bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})  # not num_warps
        launches.append((self.fn, bound.arguments))
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    _run_every_kernel()
    kernels = {fn.__name__ for fn, _ in launches}
    assert {"logprob_rows_kernel", "dlogits_rows_kernel", "policy_rows_kernel", "policy_loss_kernel"} <= kernels
    for fn, args in launches:
        params = inspect.signature(fn).parameters
        for name, value in args.items():
            if isinstance(value, float):
                assert params[name].annotation in ("tl.float64", tl.float64), \
                    f"{fn.__name__}({name}=...) gets a Python float in an fp32 parameter"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_fp64_kernels_match_the_fp64_torch_twin():
    """Compiled kernels on fp64 inputs: temperature 0.7 and clip 0.13 exactly (fp32 scalars give ~1e-8)."""
    for got, want in zip(_run_every_kernel("triton", "cuda"), _run_every_kernel("torch", "cuda")):
        assert rel_err(got, want) < 1e-12
