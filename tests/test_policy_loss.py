import itertools
import math

import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import reference as R

from _helpers import make_lm_inputs, make_token_inputs, rel_err

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
def test_policy_loss_matches_oracle(kw, agg):
    shape = (4, 13)
    old, adv, mask, ref = make_token_inputs(shape)
    mask[2] = False  # an all-masked row
    logp = (old + 0.3 * torch.randn(shape, dtype=torch.float64)).float().requires_grad_()
    ent = torch.rand(shape).requires_grad_()
    loss, metrics = dk.policy_loss(logp, old.float(), adv.float(), mask, ref_logprobs=ref.float(), entropy=ent,
                                   loss_agg=agg, **kw)
    gl, ge = torch.autograd.grad(loss, (logp, ent))
    lp64, ent64 = logp.detach().double().requires_grad_(), ent.detach().double().requires_grad_()
    want = R.policy_loss(lp64, old, adv, mask, ref=ref, entropy=ent64, loss_agg=agg, **kw)
    wl, we = torch.autograd.grad(want, (lp64, ent64), allow_unused=True)
    assert loss.dtype == torch.float32
    assert rel_err(loss, want) < 2e-4
    assert rel_err(gl, wl) < 2e-4
    if we is not None:
        assert rel_err(ge, we) < 2e-4
    assert set(metrics) >= {"clipfrac", "ratio_mean", "kl", "entropy"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad for v in metrics.values())


def test_metrics_values():
    old, adv, mask, ref = make_token_inputs((50,))
    logp = old + 0.5 * torch.randn(50, dtype=torch.float64)
    _, m = dk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1, dual_clip=3.0)
    sel = mask
    ratio = torch.exp(logp - old)[sel]
    s1 = -adv[sel] * ratio
    s2 = -adv[sel] * ratio.clamp(0.8, 1.2)
    torch.testing.assert_close(m["ratio_mean"].double(), ratio.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["clipfrac"].double(), (s2 > s1).double().mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m["ppo_kl"].double(), (old - logp)[sel].mean(), rtol=1e-5, atol=1e-6)
    d = (ref - logp)[sel]
    torch.testing.assert_close(m["kl"].double(), (d.exp() - d - 1).mean(), rtol=1e-5, atol=1e-6)
    assert "clipfrac_lower" in m


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("kw,agg", [(dict(), "token-mean"),
                                    (dict(kl_coef=0.1, entropy_coef=0.02, dual_clip=3.0), "seq-mean-token-mean"),
                                    (dict(kl_coef=0.3, kl_type="k2", clip_high=0.3), "seq-mean-token-sum"),
                                    (dict(entropy_coef=-0.01, normalizer=torch.tensor(40.0)), "token-mean")])
def test_fused_equals_unfused_and_oracle(memory, kw, agg):
    from dvpo_kernels import _config

    old_block, old_slice = _config.MAX_BLOCK_ELEMENTS, _config.LEAN_VOCAB_SLICE
    _config.MAX_BLOCK_ELEMENTS, _config.LEAN_VOCAB_SLICE = 2000, 61
    try:
        b, t, h, v = 3, 11, 48, 257
        hidden, weight, bias, tgt = make_lm_inputs(0, h, v, lead=(b, t), dtype=torch.float32)
        old, adv, mask, ref = make_token_inputs((b, t), dtype=torch.float32)
        mask[1] = False
        loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, temperature=0.8,
                                             ref_logprobs=ref, loss_agg=agg, memory=memory, **kw)
        grads = torch.autograd.grad(loss, (hidden, weight, bias))
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.8, return_entropy=True)
        loss2, metrics2 = dk.policy_loss(lp, old, adv, mask, ref_logprobs=ref, loss_agg=agg,
                                         entropy=ent if kw.get("entropy_coef") else None, **kw)
        grads2 = torch.autograd.grad(loss2, (hidden, weight, bias))
        h64, w64, b64 = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
        rlp, rent = R.linear_logprobs(h64, w64, tgt, b64, 0.8)
        rkw = dict(kw)
        if isinstance(rkw.get("normalizer"), torch.Tensor):
            rkw["normalizer"] = float(rkw["normalizer"])
        want = R.policy_loss(rlp, old, adv, mask, ref=ref, entropy=rent, loss_agg=agg, **rkw)
        rgrads = torch.autograd.grad(want, (h64, w64, b64))
    finally:
        _config.MAX_BLOCK_ELEMENTS, _config.LEAN_VOCAB_SLICE = old_block, old_slice
    assert rel_err(loss, want) < 2e-4 and rel_err(loss, loss2) < 2e-4
    for a, c, r in zip(grads, grads2, rgrads):
        assert rel_err(a, r) < 2e-4 and rel_err(a, c) < 2e-4
    for k in metrics2:
        torch.testing.assert_close(metrics[k], metrics2[k], rtol=1e-4, atol=1e-5)
    # masked tokens get exactly zero gradient
    assert (grads[0][~mask] == 0).all()


def test_gradcheck_float64():
    hidden, weight, bias, tgt = make_lm_inputs(7, 5, 19)
    old, adv, mask, ref = make_token_inputs((7,))
    # keep the ratio inside the clip range or away from its kinks so finite differences are valid
    with torch.no_grad():
        old = dk.linear_logprobs(hidden, weight, tgt, bias=bias) + 0.05 * torch.randn(7, dtype=torch.float64)
    for memory in ("speed", "lean"):
        fn = lambda h, w, b: dk.fused_policy_loss(h, w, tgt, old, adv, mask, bias=b, ref_logprobs=ref, kl_coef=0.1,
                                                  entropy_coef=0.03, temperature=1.1, memory=memory)[0]
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    lp = old.clone().add_(0.01).requires_grad_()
    ent = torch.rand(7, dtype=torch.float64, requires_grad=True)
    fn = lambda lp, e: dk.policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.2, entropy=e,
                                      entropy_coef=0.1, loss_agg="seq-mean-token-sum")[0]
    assert torch.autograd.gradcheck(fn, (lp, ent))


@pytest.mark.parametrize("memory", ["speed", "lean"])
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_is_finite_zero(memory, agg):
    hidden, weight, bias, tgt = make_lm_inputs(9, 48, 70, dtype=torch.float32)
    old, adv, _, ref = make_token_inputs((9,), dtype=torch.float32)
    mask = torch.zeros(9, dtype=torch.bool)
    loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, ref_logprobs=ref,
                                         kl_coef=0.1, entropy_coef=0.01, loss_agg=agg, memory=memory)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hidden.grad, weight.grad, bias.grad):
        assert torch.isfinite(t).all() and (t == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())
    lp = torch.zeros(9, requires_grad=True)
    loss2, _ = dk.policy_loss(lp, old, adv, mask, loss_agg=agg)
    loss2.backward()
    assert loss2.item() == 0.0 and (lp.grad == 0).all()


def test_garbage_on_masked_tokens_does_not_leak():
    old, adv, mask, ref = make_token_inputs((20,), dtype=torch.float32)
    mask[:5] = False
    old[:5], adv[:5], ref[:5] = float("nan"), float("inf"), float("nan")
    lp = torch.full((20,), -1.0, requires_grad=True)
    loss, metrics = dk.policy_loss(lp, old, adv, mask, ref_logprobs=ref, kl_coef=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and (lp.grad[:5] == 0).all()
    assert all(torch.isfinite(v) for v in metrics.values())


def test_modules_match_functional():
    hidden, weight, bias, tgt = make_lm_inputs(12, 48, 90, dtype=torch.float32)
    old, adv, mask, ref = make_token_inputs((12,), dtype=torch.float32)
    mod = dk.FusedPolicyLoss(clip_low=0.1, kl_coef=0.1, loss_agg="seq-mean-token-mean")
    a, _ = mod(hidden, weight, tgt, old, adv, mask, ref_logprobs=ref, bias=bias)
    b, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, ref_logprobs=ref, clip_low=0.1,
                                kl_coef=0.1, loss_agg="seq-mean-token-mean")
    assert a.item() == b.item()


def test_frozen_head_skips_its_gradient():
    hidden, weight, bias, tgt = make_lm_inputs(12, 48, 90, dtype=torch.float32)
    weight.requires_grad_(False)
    bias.requires_grad_(False)
    old, adv, mask, _ = make_token_inputs((12,), dtype=torch.float32)
    loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_reference_ignores_targets_at_masked_positions():
    hidden, weight, bias, tgt = make_lm_inputs(10, 8, 17)
    mask = torch.arange(10) % 3 != 0
    for bad in (-100, 22):
        lp, ent = R.linear_logprobs(hidden, weight, torch.where(mask, tgt, bad), bias, 0.9, mask=mask)
        want_lp, want_ent = R.linear_logprobs(hidden, weight, tgt, bias, 0.9)
        assert torch.equal(lp[mask], want_lp[mask]) and torch.equal(ent, want_ent)


def test_gradcheck_float64_framework_options():
    """Soft-capping and scale (gradients through tanh), importance weights, [B] advantages. (On-policy
    has a stop-gradient by definition, so finite differences cannot check it.)"""
    hidden, weight, bias, tgt = make_lm_inputs(0, 5, 19, lead=(2, 4))
    _, _, mask, ref = make_token_inputs((2, 4))
    adv = torch.tensor([0.7, -1.3], dtype=torch.float64)
    isw = torch.tensor([[0.5, 1.2, 0.9, 1.0], [2.0, 0.3, 1.1, 0.8]], dtype=torch.float64)
    with torch.no_grad():
        old = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=1.1, logit_softcap=2.0, logit_scale=0.9)
        old += 0.05 * torch.randn(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for memory in ("speed", "lean"):
        fn = lambda h, w, b: dk.fused_policy_loss(h, w, tgt, old, adv, mask, bias=b, ref_logprobs=ref, kl_coef=0.1,
                                                  kl_type="mse", entropy_coef=0.03, temperature=1.1, is_weights=isw,
                                                  logit_softcap=2.0, logit_scale=0.9, loss_agg="seq-mean-token-sum-norm",
                                                  memory=memory)[0]
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    fn = lambda h, w, b: dk.linear_logprobs(h, w, tgt, bias=b, return_entropy=True, logit_softcap=1.5, logit_scale=1.3)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_on_policy_is_the_gradient_of_logp_times_advantage():
    """old_logprobs=None: loss -A * exp(logp - stopgrad(logp)), i.e. value -mean(A), gradient -A dlogp."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.5]], requires_grad=True)
    adv = torch.tensor([1.5, -0.5])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss, m = dk.policy_loss(logp, None, adv, mask, clip_low=0.1, clip_high=0.1)
    (g,) = torch.autograd.grad(loss, logp)
    a = adv[:, None].expand(2, 3)
    torch.testing.assert_close(loss, -(a * mask).sum() / 5)
    torch.testing.assert_close(g, -a * mask / 5)
    assert m["clipfrac"] == 0 and m["ratio_mean"] == 1


def test_seq_mean_token_sum_norm_is_dr_grpo():
    """Dr. GRPO: each row's masked sum over one constant (the horizon loss_mask.shape[-1] unless
    loss_scale_factor is given), then the mean over all rows, the empty one included."""
    logp = -torch.rand(3, 6, dtype=torch.float64)
    old = logp.detach().clone()
    adv = torch.randn(3, 6, dtype=torch.float64)
    mask = torch.rand(3, 6) > 0.3
    mask[2] = False
    for factor, const in ((None, 6.0), (4096.0, 4096.0)):
        loss, _ = dk.policy_loss(logp, old, adv, mask, loss_agg="seq-mean-token-sum-norm", loss_scale_factor=factor)
        torch.testing.assert_close(loss, (-adv * mask).sum(-1).mean() / const)


@pytest.mark.parametrize("name,verl", [("kl", "k1"), ("mse", "k2")])
def test_verl_kl_names_alias_ours(name, verl):
    old, adv, mask, ref = make_token_inputs((30,))
    logp = old + 0.3
    a, ma = dk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.2, kl_type=name)
    b, mb = dk.policy_loss(logp, old, adv, mask, ref_logprobs=ref, kl_coef=0.2, kl_type=verl)
    assert a.item() == b.item() and ma["kl"].item() == mb["kl"].item()


def test_low_var_kl_clamps_as_verl():
    logp = torch.tensor([-1.0, -1.0, -30.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, 2.0, -1.0, -25.0], dtype=torch.float64)  # d = -0.5, 3 (k3 > 10), 29, -24
    zeros, mask = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.bool)
    loss, m = dk.policy_loss(logp, logp.detach(), zeros, mask, ref_logprobs=ref, kl_coef=1.0, kl_type="low_var_kl")
    (g,) = torch.autograd.grad(loss, logp)
    d = (ref - logp.detach()).clamp(-20, 20)
    want = (d.exp() - d - 1).clamp(max=10)
    torch.testing.assert_close(loss, want.mean())
    want_g = torch.zeros(4, dtype=torch.float64)
    want_g[0] = (1 - math.exp(-0.5)) / 4  # dk3/dlogp = 1 - e^d; zero where a clamp binds
    torch.testing.assert_close(g, want_g)


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_dvpo_loss_on_policy_with_kl_reward(memory):
    """old_logprobs=None in dvpo_loss: the KL reward uses the current log-probs, the loss is on-policy."""
    b, t, h, v = 2, 6, 16, 37
    hidden, weight, bias, tgt = make_lm_inputs(0, h, v, lead=(b, t), dtype=torch.float32)
    _, _, mask, ref = make_token_inputs((b, t), dtype=torch.float32)
    gvm = torch.randn(b, t, 8, generator=torch.Generator().manual_seed(1))
    vw = torch.randn(8, generator=torch.Generator().manual_seed(2))
    kw = dict(ref_logprobs=ref, kl_coef=0.1, bias=bias, logit_softcap=3.0, memory=memory)
    loss, _ = dk.dvpo_loss(hidden, weight, torch.where(mask, tgt, -100), None, mask, gvm, vw, None, **kw)
    with torch.no_grad():
        now = dk.linear_logprobs(hidden, weight, tgt, bias=bias, logit_softcap=3.0)
    want, _ = dk.dvpo_loss(hidden, weight, tgt, now, mask, gvm, vw, None, **kw)
    torch.testing.assert_close(loss, want)
