"""Every bad input raises a ValueError that names the offending argument."""
import pytest
import torch

import dvpo_kernels as dk

N, H, V = 6, 8, 11


def _lm():
    return torch.randn(N, H), torch.randn(V, H), torch.randint(0, V, (N,))


def _tok():
    return torch.zeros(N), torch.ones(N), torch.ones(N, dtype=torch.bool)


def _fused(**kw):
    h, w, t = _lm()
    old, adv, m = _tok()
    args = dict(hidden=h, weight=w, targets=t, old_logprobs=old, advantages=adv, mask=m)
    args.update(kw)
    return dk.fused_policy_loss(**args)


def _pl(**kw):
    old, adv, m = _tok()
    args = dict(logprobs=torch.zeros(N), old_logprobs=old, advantages=adv, mask=m)
    args.update(kw)
    return dk.policy_loss(**args)


BAD_LOSS_KW = [
    ("clip_low", dict(clip_low=1.0)), ("clip_low", dict(clip_low=-0.1)), ("clip_high", dict(clip_high=-0.2)),
    ("dual_clip", dict(dual_clip=1.0)), ("dual_clip", dict(dual_clip=0.5)), ("kl_type", dict(kl_type="k4")),
    ("loss_agg", dict(loss_agg="mean")), ("kl_coef", dict(kl_coef=float("nan"))),
    ("entropy_coef", dict(entropy_coef=float("inf"))), ("normalizer", dict(normalizer=0)),
    ("ref_logprobs", dict(ref_logprobs=torch.zeros(N + 1))), ("advantages", dict(advantages=torch.ones(N, 2))),
    ("mask", dict(mask=torch.tensor([0, 1, 2, 0, 1, 1]))), ("mask", dict(mask=torch.ones(N + 1))),
    ("old_logprobs", dict(old_logprobs=torch.zeros(N, dtype=torch.int64))),
]


@pytest.mark.parametrize("name,kw", BAD_LOSS_KW)
def test_policy_losses_reject(name, kw):
    for fn in (_fused, _pl):
        with pytest.raises(ValueError, match=name):
            fn(**kw)


@pytest.mark.parametrize("name,kw", [
    ("targets", dict(targets=torch.full((N,), V))), ("targets", dict(targets=torch.full((N,), -1))),
    ("targets", dict(targets=torch.zeros(N))), ("targets", dict(targets=torch.zeros(N + 1, dtype=torch.long))),
    ("temperature", dict(temperature=0.0)), ("temperature", dict(temperature=-1.0)),
    ("weight", dict(weight=torch.randn(V, H + 1))), ("weight", dict(weight=torch.randn(V, H).double())),
    ("bias", dict(bias=torch.zeros(V + 1))), ("memory", dict(memory="fast")), ("hidden", dict(hidden=torch.randn(H))),
])
def test_lm_head_ops_reject(name, kw):
    with pytest.raises(ValueError, match=name):
        _fused(**kw)
    h, w, t = _lm()
    args = dict(hidden=h, weight=w, targets=t)
    args.update({k: v for k, v in kw.items() if k in ("hidden", "weight", "targets", "bias", "temperature", "memory")})
    with pytest.raises(ValueError, match=name):
        dk.linear_logprobs(**args)


def test_logprobs_must_be_float():
    with pytest.raises(ValueError, match="logprobs"):
        _pl(logprobs=torch.zeros(N, dtype=torch.long))


@pytest.mark.parametrize("name,kw", [("gamma", dict(gamma=1.5)), ("gamma", dict(gamma=-0.1)), ("lam", dict(lam=2.0)),
                                     ("lam", dict(lam=float("nan"))), ("rewards", dict(rewards=torch.zeros(2, 4))),
                                     ("mask", dict(mask=torch.full((2, 3), 3))), ("values", dict(values=torch.zeros(6)))])
def test_gae_rejects(name, kw):
    args = dict(values=torch.zeros(2, 3), rewards=torch.zeros(2, 3), mask=torch.ones(2, 3))
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        dk.gae(**args)


def test_masked_whiten_rejects():
    with pytest.raises(ValueError, match="mask"):
        dk.masked_whiten(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="eps"):
        dk.masked_whiten(torch.zeros(3), torch.ones(3), eps=-1.0)


@pytest.mark.parametrize("name,kw", [
    ("value_norm", dict(value_norm="row")), ("value_weight", dict(value_weight=torch.zeros(2, H))),
    ("value_bias", dict(value_bias=torch.zeros(2))), ("score", dict(score=torch.zeros(3))),
    ("old_logprobs", dict(ref_logprobs=torch.zeros(2, 5))), ("kl_coef", dict(kl_coef=0.1)),
    ("mask", dict(mask=torch.ones(2, 4))), ("gvm_hidden", dict(gvm_hidden=torch.zeros(2, 5))),
    ("gamma", dict(gamma=1.01)), ("ref_logprobs", dict(ref_logprobs=torch.zeros(2, 4),
                                                      old_logprobs=torch.zeros(2, 5))),
])
def test_dvpo_advantages_rejects(name, kw):
    args = dict(gvm_hidden=torch.zeros(2, 5, H), value_weight=torch.zeros(H), value_bias=None,
                mask=torch.ones(2, 5))
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        dk.dvpo_advantages(**args)


def test_value_head_rejects():
    with pytest.raises(ValueError, match="weight"):
        dk.value_head(torch.zeros(3, H), torch.zeros(H + 1))
    with pytest.raises(ValueError, match="bias"):
        dk.value_head(torch.zeros(3, H), torch.zeros(H), float("inf"))


def test_backend_keyword_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        dk.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), backend="cuda")
    with pytest.raises(ValueError, match="kl_in"):
        h, w, t = _lm()
        dk.dvpo_loss(h[None], w, t[None], torch.zeros(1, N), torch.ones(1, N), torch.zeros(1, N, H), torch.zeros(H),
                     None, kl_in="both")


def test_nan_inputs_do_not_crash():
    h, w, t = _lm()
    h[0] = float("nan")
    lp = dk.linear_logprobs(h, w, t)
    assert torch.isnan(lp[0]) and torch.isfinite(lp[1:]).all()
    v = torch.zeros(2, 3)
    v[0, 1] = float("inf")
    a, _ = dk.gae(v, torch.zeros(2, 3), torch.ones(2, 3))
    assert torch.isfinite(a[1]).all()


def test_targets_are_checked_only_at_unmasked_positions():
    h, w, t = _lm()
    old, adv, m = _tok()
    m[2] = False
    t[2] = -100
    dk.fused_policy_loss(h, w, t, old, adv, m)
    t[3] = -100
    with pytest.raises(ValueError, match="targets.*unmasked"):
        dk.fused_policy_loss(h, w, t, old, adv, m)
    with pytest.raises(ValueError, match="targets"):
        dk.linear_logprobs(h, w, t)  # no mask: every target must be a vocab row


@pytest.mark.parametrize("name,kw", [
    ("is_weights", dict(is_weights=torch.ones(N + 1))), ("is_weights", dict(is_weights=torch.ones(N, dtype=torch.long))),
    ("loss_scale_factor", dict(loss_scale_factor=0.0, loss_agg="seq-mean-token-sum-norm")),
    ("loss_scale_factor", dict(loss_scale_factor=8.0)), ("normalizer", dict(normalizer=3.0, loss_agg="seq-mean-token-sum-norm")),
    ("kl_type", dict(kl_type="full")), ("advantages", dict(advantages=torch.ones(2))),
])
def test_framework_options_reject(name, kw):
    for fn in (_fused, _pl):
        with pytest.raises(ValueError, match=name):
            fn(**kw)


@pytest.mark.parametrize("name,kw", [("logit_softcap", dict(logit_softcap=0.0)), ("logit_softcap", dict(logit_softcap=-1.0)),
                                     ("logit_scale", dict(logit_scale=float("inf"))), ("logit_scale", dict(logit_scale=0.0))])
def test_logit_transform_rejects(name, kw):
    with pytest.raises(ValueError, match=name):
        _fused(**kw)
    h, w, t = _lm()
    with pytest.raises(ValueError, match=name):
        dk.linear_logprobs(h, w, t, **kw)


def test_row_advantages_need_row_layout():
    old, adv, m = _tok()
    with pytest.raises(ValueError, match="advantages"):
        dk.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), torch.ones(2, 3))
    dk.policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3))
