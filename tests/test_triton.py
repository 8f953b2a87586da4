"""The Triton backend against the float64 oracle and its PyTorch twin.

On the CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1), on
small odd shapes with shrunken chunk budgets and tiles so that every path spans several token
chunks, vocab slices and vocab tiles. The ``gpu`` tests run the real shapes on a CUDA device.
"""
import itertools

import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import _config, reference as R

from _helpers import LargestTensor, make_lm_inputs, make_token_inputs, rel_err

triton_backend = pytest.importorskip("dvpo_kernels.triton_backend")
from dvpo_kernels.triton_backend import gemm, tiles  # noqa: E402

# CPU-tensor tests need the Triton interpreter, gpu ones compiled kernels (tests/conftest.py).
pytestmark = pytest.mark.triton

TRITON = "triton"
MEMORY = ["speed", "lean"]


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks of a few rows, vocab slices and tiles that divide nothing, several token blocks."""
    monkeypatch.setattr(_config, "MAX_BLOCK_ELEMENTS", 2000)
    monkeypatch.setattr(_config, "LEAN_VOCAB_SLICE", 61)
    monkeypatch.setattr(tiles, "ROW_BLOCK", 64)
    monkeypatch.setattr(tiles, "TOKEN_BLOCK", 16)


def _grads(out, inputs):
    return torch.autograd.grad(out, [t for t in inputs if t is not None])


def _oracle_loss(hidden, weight, bias, tgt, temperature, old, adv, mask, ref, kw):
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    lp, ent = R.linear_logprobs(h64, w64, tgt, b64, temperature)
    rkw = dict(kw)
    if isinstance(rkw.get("normalizer"), torch.Tensor):
        rkw["normalizer"] = float(rkw["normalizer"])
    loss = R.policy_loss(lp, old, adv, mask, ref=ref, entropy=ent, **rkw)
    return loss, _grads(loss, (h64, w64, b64))


# --- linear_logprobs ---------------------------------------------------------------------------

@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("n,v", [(1, 301), (37, 263)])
def test_linear_logprobs_values_and_grads(n, v, memory, small_tiles):
    hidden, weight, bias, tgt = make_lm_inputs(n, 48, v, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    results = {}
    for backend in (TRITON, "torch"):
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.7, return_entropy=True,
                                     memory=memory, backend=backend)
        results[backend] = (lp, ent) + _grads((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight, bias))
    rlp, rent = R.linear_logprobs(hidden, weight, tgt, bias, 0.7)
    want = (rlp, rent) + _grads((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum(), (hidden, weight, bias))
    for got, twin, ref in zip(results[TRITON], results["torch"], want):
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert rel_err(got, ref) < 2e-5
        assert rel_err(got, twin) < 2e-5
    assert (results[TRITON][0] <= 0).all() and (results[TRITON][1] >= 0).all()


def test_batch_time_layout_without_bias_or_entropy(small_tiles):
    hidden, weight, _, tgt = make_lm_inputs(0, 48, 101, lead=(3, 7), bias=False, dtype=torch.float32)
    weight.requires_grad_(False)
    lp = dk.linear_logprobs(hidden, weight, tgt, memory="lean", backend=TRITON)
    assert lp.shape == (3, 7)
    (dh,) = torch.autograd.grad(lp.sum(), hidden)
    rlp, _ = R.linear_logprobs(hidden, weight, tgt)
    (rdh,) = torch.autograd.grad(rlp.sum(), hidden)
    assert rel_err(lp, rlp) < 2e-5 and rel_err(dh, rdh) < 2e-5


def test_float64_is_exact(small_tiles):
    hidden, weight, bias, tgt = make_lm_inputs(11, 48, 131)
    lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.5, return_entropy=True,
                                 backend=TRITON)
    grads = _grads(lp.sum() + 0.3 * ent.sum(), (hidden, weight, bias))
    rlp, rent = R.linear_logprobs(hidden, weight, tgt, bias, 0.5)
    rgrads = _grads(rlp.sum() + 0.3 * rent.sum(), (hidden, weight, bias))
    assert lp.dtype == torch.float64
    for got, want in zip((lp, ent) + grads, (rlp, rent) + rgrads):
        assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("memory", MEMORY)
def test_bfloat16_matches_twin_and_eager_error(memory, small_tiles):
    """16-bit inputs: bf16 logits GEMM, fp32 statistics, dW/dH summed in fp32 (Triton GEMM on the CPU)."""
    hidden, weight, bias, tgt = make_lm_inputs(29, 48, 263, dtype=torch.bfloat16)
    old, adv, mask, _ = make_token_inputs((29,), dtype=torch.float32)
    kw = dict(bias=bias, temperature=0.9, entropy_coef=0.01, memory=memory)
    out = {}
    for backend in (TRITON, "torch"):
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, backend=backend, **kw)
        out[backend] = (loss,) + _grads(loss, (hidden, weight, bias))
    want = _oracle_loss(hidden, weight, bias, tgt, 0.9, old, adv, mask, None, dict(entropy_coef=0.01))
    for got, twin, ref in zip(out[TRITON], out["torch"], (want[0],) + want[1]):
        assert got.dtype == twin.dtype
        assert rel_err(got, twin) < 2e-2
        assert rel_err(got, ref) < rel_err(twin, ref) + 1e-2


# --- policy_loss and fused_policy_loss ---------------------------------------------------------

OPTIONS = [
    dict(),
    dict(clip_low=0.1, clip_high=0.28),
    dict(dual_clip=3.0),
    dict(kl_coef=0.1, kl_type="k1"),
    dict(kl_coef=0.05, kl_type="k2"),
    dict(kl_coef=0.2, kl_type="k3", dual_clip=2.0),
    dict(entropy_coef=0.01),
    dict(normalizer=57.0),
]
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]


@pytest.mark.parametrize("kw,agg", list(itertools.product(OPTIONS, AGGS)))
def test_policy_loss_matches_oracle_and_twin(kw, agg, small_tiles):
    shape = (4, 13)
    old, adv, mask, ref = make_token_inputs(shape)
    mask[2] = False
    old, adv, ref = old.float(), adv.float(), ref.float()
    # log-ratios spread over [-1.5, 1.5] cross the clip bounds; two beyond +-20 test the clamp
    logp = (old.double() + 1.5 * (2 * torch.rand(shape, generator=torch.Generator().manual_seed(3)) - 1)).float()
    logp[0, 0], logp[1, 1] = old[0, 0] + 25.0, old[1, 1] - 30.0
    logp.requires_grad_()
    ent = torch.rand(shape).requires_grad_()
    out = {}
    for backend in (TRITON, "torch"):
        loss, metrics = dk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent, loss_agg=agg,
                                       backend=backend, **kw)
        out[backend] = (loss, metrics) + torch.autograd.grad(loss, (logp, ent))
    lp64, ent64 = logp.detach().double().requires_grad_(), ent.detach().double().requires_grad_()
    want = R.policy_loss(lp64, old, adv, mask, ref=ref, entropy=ent64, loss_agg=agg, **kw)
    wl, we = torch.autograd.grad(want, (lp64, ent64), allow_unused=True)
    loss, metrics, gl, ge = out[TRITON]
    assert loss.dtype == torch.float32
    assert rel_err(loss, want) < 1e-5 and rel_err(gl, wl) < 1e-5
    if we is not None:
        assert rel_err(ge, we) < 1e-5
    torch.testing.assert_close(gl, out["torch"][2], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ge, out["torch"][3], rtol=1e-6, atol=1e-7)
    assert metrics.keys() == out["torch"][1].keys()
    for k, val in metrics.items():
        torch.testing.assert_close(val, out["torch"][1][k], rtol=1e-5, atol=1e-6)
    assert (gl[~mask] == 0).all()


FUSED_CASES = [
    (dict(), "token-mean", None),
    (dict(kl_coef=0.1, kl_type="k1", entropy_coef=0.02, dual_clip=3.0), "seq-mean-token-mean", (3, 11)),
    (dict(kl_coef=0.3, kl_type="k2", clip_low=0.1, clip_high=0.3), "seq-mean-token-sum", (3, 11)),
    (dict(kl_coef=0.2, kl_type="k3", entropy_coef=-0.01, normalizer=torch.tensor(40.0)), "token-mean", None),
    (dict(dual_clip=2.0, normalizer=3.0), "seq-mean-token-mean", (3, 11)),
]


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("kw,agg,lead", FUSED_CASES)
def test_fused_policy_loss_matches_oracle_and_twin(kw, agg, lead, memory, small_tiles):
    n, h, v = 33, 48, 257
    hidden, weight, bias, tgt = make_lm_inputs(n, h, v, lead=lead, dtype=torch.float32)
    shape = tgt.shape
    old, adv, mask, ref = make_token_inputs(shape, dtype=torch.float32)
    if lead is not None:
        mask[1] = False  # an all-masked row
    with torch.no_grad():
        lp_now = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.8)
        old = (lp_now + 0.4 * torch.randn(shape, generator=torch.Generator().manual_seed(9))).float()
    args = (hidden, weight, tgt, old, adv, mask)
    common = dict(bias=bias, temperature=0.8, ref_logprobs=ref, loss_agg=agg, memory=memory, **kw)
    out = {}
    for backend in (TRITON, "torch"):
        loss, metrics = dk.fused_policy_loss(*args, backend=backend, **common)
        out[backend] = (loss, metrics) + _grads(loss, (hidden, weight, bias))
    want_loss, want_grads = _oracle_loss(hidden, weight, bias, tgt, 0.8, old, adv, mask, ref,
                                         dict(kw, loss_agg=agg))
    loss, metrics, *grads = out[TRITON]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert rel_err(loss, want_loss) < 2e-5 and rel_err(loss, out["torch"][0]) < 2e-5
    for got, twin, ref_grad in zip(grads, out["torch"][2:], want_grads):
        assert got.dtype == torch.float32
        assert rel_err(got, ref_grad) < 2e-5 and rel_err(got, twin) < 2e-5
    assert metrics.keys() == out["torch"][1].keys()
    for k, val in metrics.items():
        torch.testing.assert_close(val, out["torch"][1][k], rtol=1e-5, atol=1e-6)
    assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("memory", MEMORY)
def test_fused_without_grad_and_partial_grads(memory, small_tiles):
    hidden, weight, bias, tgt = make_lm_inputs(21, 48, 199, dtype=torch.float32)
    old, adv, _, _ = make_token_inputs((21,), dtype=torch.float32)
    mask = torch.ones(21, dtype=torch.bool)  # nothing to compact
    with torch.no_grad():
        loss_ng, m_ng = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, memory=memory,
                                             backend=TRITON)
    weight.requires_grad_(False)
    loss, m = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, memory=memory, backend=TRITON)
    dh, db = torch.autograd.grad(loss, (hidden, bias))
    loss_t, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, memory=memory, backend="torch")
    dh_t, db_t = torch.autograd.grad(loss_t, (hidden, bias))
    assert rel_err(loss_ng, loss_t) < 2e-5 and rel_err(loss, loss_t) < 2e-5
    assert rel_err(dh, dh_t) < 2e-5 and rel_err(db, db_t) < 2e-5
    torch.testing.assert_close(m_ng["clipfrac"], m["clipfrac"])


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_is_finite_zero(memory, agg, small_tiles):
    hidden, weight, bias, tgt = make_lm_inputs(9, 48, 70, dtype=torch.float32)
    old, adv, _, ref = make_token_inputs((9,), dtype=torch.float32)
    mask = torch.zeros(9, dtype=torch.bool)
    loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, ref_logprobs=ref,
                                         kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, memory=memory,
                                         backend=TRITON)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden.grad, weight.grad, bias.grad):
        assert (t == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    lp = torch.zeros(9, requires_grad=True)
    loss2, _ = dk.policy_loss(lp, old, adv, mask, loss_agg=agg, backend=TRITON)
    loss2.backward()
    assert loss2.item() == 0.0 and (lp.grad == 0).all()


def test_garbage_on_masked_tokens_does_not_leak(small_tiles):
    old, adv, mask, ref = make_token_inputs((40,), dtype=torch.float32)
    mask[:5] = False
    old[:5], adv[:5], ref[:5] = float("nan"), float("inf"), float("nan")
    lp = torch.full((40,), -1.0, requires_grad=True)
    loss, metrics = dk.policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, backend=TRITON)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and (lp.grad[:5] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize("memory", MEMORY)
def test_extreme_logits_stay_finite(memory, small_tiles):
    hidden, weight, _, tgt = make_lm_inputs(9, 48, 150, dtype=torch.float32, bias=False)
    big = (hidden.detach() * 1e4).requires_grad_()
    lp, ent = dk.linear_logprobs(big, weight, tgt, return_entropy=True, memory=memory, backend=TRITON)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and (lp <= 0).all() and (ent >= 0).all()
    old, adv, mask, _ = make_token_inputs((9,), dtype=torch.float32)
    loss, _ = dk.fused_policy_loss(big, weight, tgt, old, adv, mask, entropy_coef=0.01, memory=memory,
                                   backend=TRITON)
    dh, dw = torch.autograd.grad(loss, (big, weight))
    assert torch.isfinite(loss) and torch.isfinite(dh).all() and torch.isfinite(dw).all()


@pytest.mark.parametrize("memory", MEMORY)
def test_never_allocates_n_by_v(memory, monkeypatch):
    n, h, v = 32, 8, 256
    monkeypatch.setattr(_config, "MAX_BLOCK_ELEMENTS", 4 * v)
    monkeypatch.setattr(tiles, "ROW_BLOCK", 128)
    hidden, weight, bias, tgt = make_lm_inputs(n, h, v, dtype=torch.float32)
    old, adv, mask, _ = make_token_inputs((n,), dtype=torch.float32)
    with LargestTensor() as probe:
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, return_entropy=True, memory=memory,
                                     backend=TRITON)
        (lp.sum() + ent.sum()).backward()
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, entropy_coef=0.01,
                                       memory=memory, backend=TRITON)
        loss.backward()
    assert probe.largest <= max(4 * v, v * h) < n * v


# --- framework options: importance weights, on-policy, [B] advantages, Dr. GRPO, verl KL names, logit caps

FRAMEWORK_CASES = [
    dict(is_weights="tokens"),
    dict(is_weights="rows", advantages="rows", loss_agg="seq-mean-token-mean"),
    dict(on_policy=True, kl_coef=0.1, kl_type="kl"),
    dict(loss_agg="seq-mean-token-sum-norm", kl_coef=0.05, kl_type="mse"),
    dict(loss_agg="seq-mean-token-sum-norm", loss_scale_factor=5.0, kl_coef=0.2, kl_type="abs"),
    dict(kl_coef=0.3, kl_type="low_var_kl", dual_clip=3.0, entropy_coef=0.01),
    dict(logit_softcap=2.5, logit_scale=0.6, entropy_coef=0.02),
    dict(logit_softcap=4.0, on_policy=True, advantages="rows"),
    dict(logit_scale=1.7),
]


def _framework_inputs(case, shape, dtype=torch.float32):
    """old log-probs, advantages, mask, ref, is_weights and op keywords for one FRAMEWORK_CASES case."""
    old, adv, mask, ref = make_token_inputs(shape, dtype=dtype)
    mask[1] = False
    g = torch.Generator().manual_seed(4)
    kw = {k: v for k, v in case.items() if k not in ("is_weights", "advantages", "on_policy")}
    if case.get("advantages") == "rows":
        adv = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dtype)
    if case.get("is_weights") == "tokens":
        kw["is_weights"] = (torch.rand(shape, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    elif case.get("is_weights") == "rows":
        kw["is_weights"] = (torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return (None if case.get("on_policy") else old), adv, mask, ref, kw


def _oracle_kw(kw):
    out = {k: v for k, v in kw.items() if k not in ("logit_softcap", "logit_scale")}
    return out, dict(softcap=kw.get("logit_softcap"), scale=kw.get("logit_scale"))


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("case", FRAMEWORK_CASES)
def test_fused_framework_options_match_oracle_and_twin(case, memory, small_tiles):
    b, t, h, v = 3, 11, 48, 257
    hidden, weight, bias, tgt = make_lm_inputs(0, h, v, lead=(b, t), dtype=torch.float32)
    old, adv, mask, ref, kw = _framework_inputs(case, (b, t))
    if old is not None:
        with torch.no_grad():
            old = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.8, backend="torch",
                                     logit_softcap=kw.get("logit_softcap"), logit_scale=kw.get("logit_scale"))
            old = (old + 0.4 * torch.randn((b, t), generator=torch.Generator().manual_seed(9))).float()
    out = {}
    for backend in (TRITON, "torch"):
        loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, temperature=0.8,
                                             ref_logprobs=ref, memory=memory, backend=backend, **kw)
        out[backend] = (loss, metrics) + _grads(loss, (hidden, weight, bias))
    loss_kw, head_kw = _oracle_kw(kw)
    h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    rlp, rent = R.linear_logprobs(h64, w64, tgt, b64, 0.8, **head_kw)
    want = R.policy_loss(rlp, old, adv, mask, ref=ref, entropy=rent, **loss_kw)
    want_grads = _grads(want, (h64, w64, b64))
    loss, metrics, *grads = out[TRITON]
    assert rel_err(loss, want) < 2e-5 and rel_err(loss, out["torch"][0]) < 2e-5
    for got, twin, ref_grad in zip(grads, out["torch"][2:], want_grads):
        assert rel_err(got, ref_grad) < 2e-5 and rel_err(got, twin) < 2e-5
    for k, val in metrics.items():
        torch.testing.assert_close(val, out["torch"][1][k], rtol=1e-5, atol=1e-6)
    if old is None:
        assert metrics["clipfrac"] == 0 and metrics["ratio_mean"] == 1 and metrics["ppo_kl"] == 0
    assert (grads[0][~mask] == 0).all()


@pytest.mark.parametrize("case", [c for c in FRAMEWORK_CASES if "logit_softcap" not in c and "logit_scale" not in c])
def test_policy_loss_framework_options_match_oracle_and_twin(case, small_tiles):
    shape = (4, 13)
    old, adv, mask, ref, kw = _framework_inputs(case, shape)
    base = make_token_inputs(shape, dtype=torch.float32)[0]
    logp = (base.double() + 1.5 * (2 * torch.rand(shape, generator=torch.Generator().manual_seed(3)) - 1)).float()
    logp.requires_grad_()
    ent = torch.rand(shape, generator=torch.Generator().manual_seed(6)).requires_grad_()
    out = {}
    for backend in (TRITON, "torch"):
        loss, metrics = dk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, entropy=ent, backend=backend, **kw)
        out[backend] = (loss, metrics) + torch.autograd.grad(loss, (logp, ent), allow_unused=True)
    lp64, ent64 = logp.detach().double().requires_grad_(), ent.detach().double().requires_grad_()
    want = R.policy_loss(lp64, old, adv, mask, ref=ref, entropy=ent64, **kw)
    wl, _ = torch.autograd.grad(want, (lp64, ent64), allow_unused=True)
    loss, metrics, gl, _ = out[TRITON]
    assert rel_err(loss, want) < 1e-5 and rel_err(gl, wl) < 1e-5
    torch.testing.assert_close(gl, out["torch"][2], rtol=1e-6, atol=1e-7)
    for k, val in metrics.items():
        torch.testing.assert_close(val, out["torch"][1][k], rtol=1e-5, atol=1e-6)
    assert (gl[~mask] == 0).all()


@pytest.mark.parametrize("memory", MEMORY)
def test_linear_logprobs_softcap_and_scale(memory, small_tiles):
    hidden, weight, bias, tgt = make_lm_inputs(23, 48, 263, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(23, generator=g), torch.randn(23, generator=g)
    kw = dict(logit_softcap=1.5, logit_scale=0.8)
    results = {}
    for backend in (TRITON, "torch"):
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.7, return_entropy=True,
                                     memory=memory, backend=backend, **kw)
        results[backend] = (lp, ent) + _grads((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight, bias))
    rlp, rent = R.linear_logprobs(hidden, weight, tgt, bias, 0.7, softcap=1.5, scale=0.8)
    want = (rlp, rent) + _grads((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum(), (hidden, weight, bias))
    plain = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.7, backend=TRITON)
    assert rel_err(plain, rlp) > 1e-2  # the cap binds: logits reach several times 1.5
    for got, twin, ref in zip(results[TRITON], results["torch"], want):
        assert rel_err(got, ref) < 2e-5 and rel_err(got, twin) < 2e-5


# --- targets: every block position, masked and out-of-range ------------------------------------

@pytest.mark.parametrize("memory", MEMORY)
def test_target_in_every_vocab_block_position(memory, small_tiles):
    """V = 150 in tiles of 64: targets at both ends of the first, middle and last (partial) tile,
    plus a row whose target logit dominates (logp rounds to 0, entropy to 0: the clamped bounds)."""
    cols = [0, 1, 63, 64, 127, 128, 149]
    n, v = len(cols) + 1, 150
    hidden, weight, bias, _ = make_lm_inputs(n, 48, v, dtype=torch.float32)
    tgt = torch.tensor(cols + [5])
    with torch.no_grad():
        bias[5] = 300.0
    old, adv, _, _ = make_token_inputs((n,), dtype=torch.float32)
    mask = torch.ones(n, dtype=torch.bool)
    lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.7, return_entropy=True,
                                 memory=memory, backend=TRITON)
    grads = _grads(lp.sum() + ent.sum(), (hidden, weight, bias))
    rlp, rent = R.linear_logprobs(hidden, weight, tgt, bias, 0.7)
    rgrads = _grads(rlp.sum() + rent.sum(), (hidden, weight, bias))
    for got, want in zip((lp, ent) + grads, (rlp, rent) + rgrads):
        assert rel_err(got, want) < 2e-5
    assert (lp <= 0).all() and (ent >= 0).all() and lp[-1] == 0 and ent[-1] == 0
    loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, temperature=0.7,
                                   entropy_coef=0.01, memory=memory, backend=TRITON)
    want_loss, want_grads = _oracle_loss(hidden, weight, bias, tgt, 0.7, old, adv, mask, None,
                                         dict(entropy_coef=0.01))
    assert rel_err(loss, want_loss) < 2e-5
    for got, want in zip(_grads(loss, (hidden, weight, bias)), want_grads):
        assert rel_err(got, want) < 2e-5


@pytest.mark.parametrize("backend", [TRITON, "torch"])
@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("bad", [-100, 262])
def test_targets_at_masked_positions_are_ignored(bad, memory, backend, small_tiles):
    """-100 (Hugging Face's ignore label) or V + 5 where mask = 0: the same loss, gradients and
    metrics as valid targets there, in fused_policy_loss and dvpo_loss."""
    b, t, h, v = 3, 11, 48, 257
    hidden, weight, bias, tgt = make_lm_inputs(0, h, v, lead=(b, t), dtype=torch.float32)
    old, adv, mask, ref = make_token_inputs((b, t), dtype=torch.float32)
    mask[1] = False
    gvm = torch.randn(b, t, 16, generator=torch.Generator().manual_seed(2))
    vw = torch.randn(16, generator=torch.Generator().manual_seed(3))
    runs = []
    for targets in (tgt, torch.where(mask, tgt, bad)):
        kw = dict(bias=bias, temperature=0.8, entropy_coef=0.01, memory=memory, backend=backend)
        loss, metrics = dk.fused_policy_loss(hidden, weight, targets, old, adv, mask, ref_logprobs=ref,
                                             kl_coef=0.1, **kw)
        if backend == "torch":  # dvpo_loss runs its advantage ops on the same backend
            dloss, dmetrics = dk.dvpo_loss(hidden, weight, targets, old, mask, gvm, vw, 0.1, **kw)
            loss, metrics = loss + dloss, {**metrics, **{"dvpo_" + k: x for k, x in dmetrics.items()}}
        runs.append((loss,) + _grads(loss, (hidden, weight, bias)) + tuple(metrics.values()))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", [TRITON, "torch"])
def test_unchecked_out_of_range_targets_read_nothing(backend, small_tiles):
    """Past validation (GPU tensors are not value-checked), an out-of-range target is never read:
    its row's log-prob is NaN, the other rows are untouched and the backward stays finite."""
    from dvpo_kernels import _backends

    hidden, weight, bias, tgt = make_lm_inputs(6, 48, 150, dtype=torch.float32, grad=False)
    bad = tgt.clone()
    bad[1], bad[4] = -100, 155
    fwd = _backends.impl(backend, "linear_logprobs")
    logp, ent, lse = fwd(hidden, weight, bad, bias, 0.9, True, "speed")
    want, _, _ = fwd(hidden, weight, tgt, bias, 0.9, True, "speed")
    assert logp[[1, 4]].isnan().all()
    keep = [0, 2, 3, 5]
    assert torch.equal(logp[keep], want[keep])
    g = torch.ones(6)
    g[[1, 4]] = 0.0
    bwd = _backends.impl(backend, "linear_logprobs_backward")
    for memory in MEMORY:
        grads = bwd(g, None, hidden, weight, bad, bias, 0.9, lse, ent, memory, (True, True, True))
        assert all(torch.isfinite(x).all() for x in grads)


def test_logits_rows_are_padded_to_16(small_tiles, monkeypatch):
    """Vocab sizes that are not a multiple of 16 still get 16-element aligned rows (vector loads)."""
    from dvpo_kernels.triton_backend import linear

    strides = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                strides.append(args[1])
                return self.kernel[grid](*args, **kw)
            return launch

    for name in ("logprob_rows_kernel", "dlogits_rows_kernel", "policy_rows_kernel"):
        monkeypatch.setattr(linear, name, Recorder(getattr(linear, name)))
    hidden, weight, bias, tgt = make_lm_inputs(9, 48, 257, dtype=torch.float32)
    old, adv, mask, _ = make_token_inputs((9,), dtype=torch.float32)
    for memory in MEMORY:
        lp = dk.linear_logprobs(hidden, weight, tgt, bias=bias, memory=memory, backend=TRITON)
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, memory=memory,
                                       backend=TRITON)
        _grads(lp.sum() + loss, (hidden, weight, bias))
    assert len(strides) > 4 and all(s % 16 == 0 for s in strides)


# --- pieces ----------------------------------------------------------------------------------

@pytest.mark.parametrize("accumulate", [False, True])
def test_triton_gemm_accumulates_16bit_products_in_fp32(accumulate):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 131, generator=g).to(torch.bfloat16)  # used transposed, as dz^T
    b = torch.randn(37, 70, generator=g).to(torch.bfloat16)
    acc = torch.randn(131, 70, generator=g)
    want = a.double().t() @ b.double() + (acc.double() if accumulate else 0.0)
    gemm._triton_addmm(acc, a.t(), b, accumulate)
    assert rel_err(acc, want) < 1e-6


def test_unsupported_devices(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    assert triton_backend.unsupported(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    why = triton_backend.unsupported(torch.device("cpu"))
    if isinstance(triton_backend.logprob_rows_kernel, InterpretedFunction):
        assert why is None
    else:
        assert "set it before" in why
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in triton_backend.unsupported(torch.device("cpu"))
    assert "CUDA" in triton_backend.unsupported(torch.device("meta"))


# --- GPU: real shapes (-m gpu) ---------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
QWEN = (8192, 1536, 151936)


def _cuda_inputs(n, h, v, dtype, seed=0, scale=2.0):
    """hidden [n, h], weight [v, h] (logits of std ~scale), targets, old log-probs, advantages, mask."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) * (scale / h ** 0.5)).to(dtype).requires_grad_()
    tgt = torch.randint(0, v, (n,), device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) > 0.1
    return hidden, weight, tgt, adv, mask


def _eager(hidden, weight, tgt):
    """Materialised logits in the input dtype, fp32 log_softmax: what a trainer without fused ops runs."""
    logp_all = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    return logp_all.gather(1, tgt[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("memory", MEMORY)
def test_gpu_real_shape_error_within_eager(dtype, tol, memory):
    """Error against float64 (the torch path on fp64 copies) at most eager PyTorch's error + tol."""
    hidden, weight, tgt, adv, mask = _cuda_inputs(*QWEN, dtype)
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    with torch.no_grad():
        old = dk.linear_logprobs(h64, w64, tgt, backend="torch").float()
        old += 0.3 * torch.randn_like(old)
    loss_kw = dict(entropy_coef=0.01, clip_high=0.28)
    runs = {}
    want = dk.fused_policy_loss(h64, w64, tgt, old, adv, mask, backend="torch", **loss_kw)[0]
    runs["oracle"] = (want,) + torch.autograd.grad(want, (h64, w64))
    lp, ent = _eager(hidden, weight, tgt)
    eager = R.policy_loss(lp, old, adv, mask, entropy=ent, **loss_kw)
    runs["eager"] = (eager,) + torch.autograd.grad(eager, (hidden, weight))
    del lp, ent
    got = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, memory=memory, backend=TRITON, **loss_kw)[0]
    runs[TRITON] = (got,) + torch.autograd.grad(got, (hidden, weight))
    for ours, theirs, ref in zip(runs[TRITON], runs["eager"], runs["oracle"]):
        assert rel_err(ours, ref) <= rel_err(theirs, ref) + tol

    g_ent = torch.randn(QWEN[0], device="cuda")
    rlp, rent = dk.linear_logprobs(h64, w64, tgt, return_entropy=True, backend="torch")
    want = (rlp, rent) + torch.autograd.grad(rlp.sum() + (g_ent * rent).sum(), (h64, w64))
    lp, ent = _eager(hidden, weight, tgt)
    eager = (lp, ent) + torch.autograd.grad(lp.sum() + (g_ent * ent).sum(), (hidden, weight))
    del lp, ent
    lp, ent = dk.linear_logprobs(hidden, weight, tgt, return_entropy=True, memory=memory, backend=TRITON)
    ours = (lp, ent) + torch.autograd.grad(lp.sum() + (g_ent * ent).sum(), (hidden, weight))
    assert (lp <= 0).all() and (ent >= 0).all()
    for o, e, r in zip(ours, eager, want):
        assert rel_err(o, r) <= rel_err(e, r) + tol


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_huge_logits_stay_finite(dtype):
    hidden, weight, tgt, adv, mask = _cuda_inputs(1024, 256, 50000, dtype, scale=3e3)  # logits up to ~1e4
    lp, ent = dk.linear_logprobs(hidden, weight, tgt, return_entropy=True, backend=TRITON)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and (lp <= 0).all() and (ent >= 0).all()
    for memory in MEMORY:
        loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, lp.detach(), adv, mask, entropy_coef=0.01,
                                             memory=memory, backend=TRITON)
        grads = torch.autograd.grad(loss, (hidden, weight))
        assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
        assert all(torch.isfinite(m) for m in metrics.values())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("memory", MEMORY)
def test_gpu_70k_tokens_and_262k_vocab(memory):
    n, h, v = 70000, 64, 262144
    hidden, weight, tgt, adv, mask = _cuda_inputs(n, h, v, torch.bfloat16, scale=3.0)
    with torch.no_grad():
        old = dk.linear_logprobs(hidden, weight, tgt, backend=TRITON)
        old_torch = dk.linear_logprobs(hidden, weight, tgt, backend="torch")
    assert rel_err(old, old_torch) < 1e-2  # bf16 logits: GEMM tilings may round differently
    out = {}
    for backend in (TRITON, "torch"):
        loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old + 0.1, adv, mask, kl_coef=0.05, ref_logprobs=old,
                                       memory=memory, backend=backend)
        out[backend] = (loss,) + torch.autograd.grad(loss, (hidden, weight))
    for got, want in zip(out[TRITON], out["torch"]):
        assert torch.isfinite(got).all() and rel_err(got, want) < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("memory", MEMORY)
def test_gpu_all_masked(memory):
    hidden, weight, tgt, adv, _ = _cuda_inputs(4096, 512, 32000, torch.bfloat16)
    mask = torch.zeros(4096, dtype=torch.bool, device="cuda")
    loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, torch.zeros(4096, device="cuda"), adv, mask,
                                         memory=memory, backend=TRITON)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and not dh.any() and not dw.any()
    assert all(torch.isfinite(m) for m in metrics.values())


@pytest.mark.gpu
@needs_cuda
def test_gpu_torch_compile_fullgraph():
    b, t, h, v = 4, 256, 512, 32000
    hidden, weight, tgt, adv, mask = _cuda_inputs(b * t, h, v, torch.bfloat16)
    hidden = hidden.detach().view(b, t, h).requires_grad_()
    tgt, adv, mask = tgt.view(b, t), adv.view(b, t), mask.view(b, t)

    def step(hidden, weight):
        old = dk.linear_logprobs(hidden.detach(), weight.detach(), tgt, backend=TRITON)
        loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, entropy_coef=0.01,
                                             backend=TRITON)
        lp = dk.linear_logprobs(hidden, weight, tgt, backend=TRITON)
        return loss + 0.1 * lp.mean(), metrics["clipfrac"]

    compiled = torch.compile(step, fullgraph=True)
    loss_c, _ = compiled(hidden, weight)
    grads_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e, _ = step(hidden, weight)
    grads_e = torch.autograd.grad(loss_e, (hidden, weight))
    torch.testing.assert_close(loss_c, loss_e)
    for a, b_ in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b_)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fp32_accumulation_paths(dtype):
    """cuBLAS out_dtype=float32 (where this PyTorch has it) and the Triton GEMM agree with float64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1000, 3001, device="cuda", generator=g).to(dtype)
    b = torch.randn(1000, 770, device="cuda", generator=g).to(dtype)
    base = torch.randn(3001, 770, device="cuda", generator=g)
    want = a.double().t() @ b.double() + base.double()
    for fn in (gemm.accumulate_mm, gemm._triton_addmm):
        acc = base.clone()
        fn(acc, a.t(), b, True)
        assert rel_err(acc, want) < 1e-5

