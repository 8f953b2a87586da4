"""The LM-head ops under torch.autocast behave as F.linear does: GEMMs in the autocast dtype,
mixed 16-bit / fp32 operands accepted, statistics fp32, gradients in each input's dtype.

On the CPU with torch.autocast("cpu", dtype=torch.bfloat16); the Triton cases run under the
interpreter.
"""
import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import reference as R

from _helpers import make_lm_inputs, make_token_inputs, rel_err

BF16 = torch.bfloat16
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.fixture
def backend(request):
    if request.param == "triton":
        pytest.importorskip("dvpo_kernels.triton_backend")
    return request.param


def _inputs(n=23, h=48, v=131):
    hidden, weight, bias, tgt = make_lm_inputs(n, h, v, dtype=torch.float32)
    old, adv, mask, ref = make_token_inputs((n,), dtype=torch.float32)
    return hidden, weight, bias, tgt, old, adv, mask, ref


def _bf16_leaves(*ts):
    return [t.detach().to(BF16).requires_grad_() for t in ts]


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs)


def _run(op, backend, hidden, weight, bias, tgt, old, adv, mask, ref):
    """The scalar each op contributes to a loss (its gradient flows to hidden, weight, bias)."""
    if op == "dvpo_loss" and backend == "triton":
        pytest.skip("dvpo_loss takes one backend for both halves and triton has no advantage kernels; "
                    "its LM-head half is fused_policy_loss, tested on triton")
    if op == "linear_logprobs":
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.8, return_entropy=True,
                                     backend=backend)
        return lp, (lp * adv).sum() + 0.3 * ent.sum()
    if op == "fused_policy_loss":
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, temperature=0.8,
                                       ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01, backend=backend)
        return loss, loss
    gvm = torch.randn((1,) + hidden.shape, generator=torch.Generator().manual_seed(7))
    loss, _ = dk.dvpo_loss(hidden[None], weight, tgt[None], old[None], mask[None], gvm, gvm[0, 0], 0.1,
                           bias=bias, backend=backend)
    return loss, loss


OPS = ["linear_logprobs", "fused_policy_loss", "dvpo_loss"]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", OPS)
def test_autocast_equals_explicit_bf16_inputs_and_grads_keep_input_dtypes(op, backend):
    hidden, weight, bias, tgt, old, adv, mask, ref = _inputs()
    with autocast():
        out, scalar = _run(op, backend, hidden, weight, bias, tgt, old, adv, mask, ref)
    grads = _grads(scalar, (hidden, weight, bias))
    hb, wb, bb = _bf16_leaves(hidden, weight, bias)
    want, want_scalar = _run(op, backend, hb, wb, bb, tgt, old, adv, mask, ref)
    want_grads = _grads(want_scalar, (hb, wb, bb))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w.float(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("op", OPS)
def test_mixed_bf16_hidden_and_fp32_weight(op, backend):
    """Accepted under autocast, gradients in each input's own dtype; outside autocast a ValueError."""
    hidden, weight, bias, tgt, old, adv, mask, ref = _inputs()
    (hb,) = _bf16_leaves(hidden)
    with autocast():
        _, scalar = _run(op, backend, hb, weight, bias, tgt, old, adv, mask, ref)
    dh, dw, db = _grads(scalar, (hb, weight, bias))
    assert (dh.dtype, dw.dtype, db.dtype) == (BF16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="weight dtype"):
        _run(op, backend, hb, weight, bias, tgt, old, adv, mask, ref)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_autocast_error_within_eager_bf16_error(backend):
    """DESIGN §5: error against float64 at most eager autocast PyTorch's error + 1e-2 (relative)."""
    hidden, weight, bias, tgt, old, adv, mask, _ = _inputs(n=57, h=200, v=301)
    kw = dict(temperature=0.8, entropy_coef=0.01, clip_high=0.28)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    lp, ent = R.linear_logprobs(h64, w64, tgt, b64, 0.8)
    oracle = R.policy_loss(lp, old, adv, mask, entropy=ent, **{k: v for k, v in kw.items() if k != "temperature"})
    want = (oracle,) + _grads(oracle, (h64, w64, b64))
    with autocast():
        logits = torch.nn.functional.linear(hidden, weight, bias).float() / 0.8
    logp_all = torch.log_softmax(logits, -1)
    e_lp = logp_all.gather(1, tgt[:, None]).squeeze(1)
    e_ent = -(logp_all.exp() * logp_all).sum(-1)
    eager = R.policy_loss(e_lp, old, adv, mask, entropy=e_ent, entropy_coef=0.01, clip_high=0.28)
    eager = (eager,) + _grads(eager, (hidden, weight, bias))
    with autocast():
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, backend=backend, **kw)
    ours = (loss,) + _grads(loss, (hidden, weight, bias))
    for o, e, w in zip(ours, eager, want):
        assert o.dtype == torch.float32
        assert rel_err(o, w) <= rel_err(e, w) + 1e-2
    assert rel_err(ours[0], want[0]) > 1e-6  # the GEMM did run in bf16


def test_fp64_inputs_are_not_cast():
    """As for F.linear, autocast leaves fp64 alone: the oracle path stays exact."""
    hidden, weight, bias, tgt = make_lm_inputs(9, 48, 61)
    with autocast():
        got = dk.linear_logprobs(hidden, weight, tgt, bias=bias)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dk.linear_logprobs(hidden, weight, tgt, bias=bias), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_advantage_ops_keep_fp32_statistics_under_autocast(backend):
    """The value projection and scans run in fp32 inside the ops whatever autocast says."""
    if dk.backend_report(torch.device("cpu"))[backend] is not None:
        pytest.skip(f"the {backend} backend is not available here")
    g = torch.Generator().manual_seed(3)
    gvm = torch.randn(3, 17, 200, generator=g)
    vw = torch.randn(200, generator=g)
    mask = torch.rand(3, 17, generator=g) > 0.3
    want = dk.dvpo_advantages(gvm, vw, 0.1, mask, backend=backend)
    want_v = dk.value_head(gvm, vw, 0.1, backend=backend)
    with autocast():
        got = dk.dvpo_advantages(gvm, vw, 0.1, mask, backend=backend)
        got_v = dk.value_head(gvm, vw, 0.1, backend=backend)
    for a, b in zip(got + (got_v,), want + (want_v,)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
