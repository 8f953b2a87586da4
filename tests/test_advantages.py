import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import reference as R

from _helpers import rel_err


def _holey_mask(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=g) > 0.35
    m[0] = False  # empty row
    if b > 2:
        m[2, :] = True  # full row
    return m


@pytest.mark.parametrize("b,t", [(1, 1), (3, 17), (5, 64)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 0.0), (0.97, 1.0)])
def test_gae_matches_oracle(b, t, gamma, lam):
    g = torch.Generator().manual_seed(1)
    v, r = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    m = _holey_mask(b, t)
    a, ret = dk.gae(v, r, m, gamma=gamma, lam=lam)
    ra, rr = R.gae(v, r, m, gamma, lam)
    assert a.dtype == torch.float32
    assert rel_err(a, ra) < 2e-4 and rel_err(ret, rr) < 2e-4
    assert (a[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_identities_with_holes():
    b, t, gamma = 4, 23, 0.93
    g = torch.Generator().manual_seed(2)
    v, r = torch.randn(b, t, generator=g, dtype=torch.float64), torch.randn(b, t, generator=g, dtype=torch.float64)
    m = _holey_mask(b, t, seed=3)
    # lam = 1: advantage = discounted return-to-go over the valid tokens - V
    a1, _ = dk.gae(v, r, m, gamma=gamma, lam=1.0)
    # lam = 0: advantage = TD error, V_next = value of the next valid token (0 after the last)
    a0, _ = dk.gae(v, r, m, gamma=gamma, lam=0.0)
    for row in range(b):
        idx = m[row].nonzero().flatten().tolist()
        rtg = 0.0
        for k in reversed(range(len(idx))):
            t_k = idx[k]
            rtg = float(r[row, t_k]) + gamma * rtg
            assert abs(float(a1[row, t_k]) - (rtg - float(v[row, t_k]))) < 1e-10
            v_next = float(v[row, idx[k + 1]]) if k + 1 < len(idx) else 0.0
            td = float(r[row, t_k]) + gamma * v_next - float(v[row, t_k])
            assert abs(float(a0[row, t_k]) - td) < 1e-12


def test_masked_whiten():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 9, generator=g) * 3 + 2
    m = _holey_mask(6, 9)
    for shift in (True, False):
        out = dk.masked_whiten(x, m, shift_mean=shift)
        assert rel_err(out, R.masked_whiten(x, m, shift_mean=shift)) < 2e-4
        assert (out[~m] == 0).all()
    w = dk.masked_whiten(x, m)[m]
    assert abs(float(w.mean())) < 1e-5 and abs(float(w.std()) - 1) < 1e-4
    assert (dk.masked_whiten(x, torch.zeros_like(m)) == 0).all()
    one = torch.zeros_like(m)
    one[1, 1] = True
    assert torch.isfinite(dk.masked_whiten(x, one)).all()
    assert dk.masked_whiten(x.bfloat16(), m).dtype == torch.float32


def test_value_head_values_and_grads():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 7, 48, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 48, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True)
    v = dk.value_head(h, w, b)
    assert v.shape == (3, 7)
    torch.testing.assert_close(v, R.value_head(h, w, b))
    assert torch.autograd.gradcheck(lambda h, w, b: dk.value_head(h, w, b), (h, w, b))
    assert dk.value_head(h.detach().bfloat16(), w.detach().bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("value_norm", ["seq", "batch", "none"])
@pytest.mark.parametrize("whiten", [True, False])
def test_dvpo_advantages_matches_oracle(value_norm, whiten):
    b, t, h = 4, 19, 200
    g = torch.Generator().manual_seed(6)
    hid = torch.randn(b, t, h, generator=g)
    vw, m = torch.randn(h, generator=g) * 0.1, _holey_mask(b, t, seed=7)
    old, ref = -torch.rand(b, t, generator=g), -torch.rand(b, t, generator=g)
    score = torch.randn(b, generator=g)
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, score=score, gamma=0.99, lam=0.9,
              value_norm=value_norm, whiten_advantages=whiten)
    got = dk.dvpo_advantages(hid, vw, 0.25, m, **kw)
    want = R.dvpo_advantages(hid, vw, 0.25, m, **kw)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32
        assert rel_err(x, y) < 2e-4
        assert (x[~m] == 0).all()


def test_dvpo_advantages_score_on_last_valid_token():
    b, t, h = 2, 6, 8
    hid = torch.zeros(b, t, h)
    m = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    score = torch.tensor([2.0, -1.0])
    adv, ret, values = dk.dvpo_advantages(hid, torch.zeros(h), None, m, score=score, gamma=1.0, lam=1.0,
                                          value_norm="none", whiten_advantages=False)
    # zero values, gamma = lam = 1: every valid token's advantage is the row's score
    assert torch.equal(adv, torch.where(m, score[:, None].expand(b, t), 0.0))
    assert torch.equal(ret, adv) and (values == 0).all()


def test_bf16_hidden():
    g = torch.Generator().manual_seed(8)
    hid = torch.randn(3, 10, 48, generator=g).bfloat16()
    vw = torch.randn(48, generator=g).bfloat16()
    m = _holey_mask(3, 10)
    got = dk.dvpo_advantages(hid, vw, None, m)
    want = R.dvpo_advantages(hid, vw, None, m)
    for x, y in zip(got, want):
        assert x.dtype == torch.float32 and rel_err(x, y) < 1e-4


def test_dvpo_loss_is_advantages_then_fused_loss():
    b, t, h, v = 2, 9, 48, 97
    g = torch.Generator().manual_seed(9)
    ph = torch.randn(b, t, h, generator=g, requires_grad=True)
    w = (torch.randn(v, h, generator=g) * 0.1).requires_grad_()
    tgt = torch.randint(0, v, (b, t), generator=g)
    old, ref = -torch.rand(b, t, generator=g) * 4, -torch.rand(b, t, generator=g) * 4
    m = _holey_mask(b, t)
    gh, vw = torch.randn(b, t, h, generator=g), torch.randn(h, generator=g)
    loss, metrics = dk.dvpo_loss(ph, w, tgt, old, m, gh, vw, 0.0, ref_logprobs=ref, kl_coef=0.05, lam=0.9,
                                 clip_high=0.28)
    adv, _, _ = dk.dvpo_advantages(gh, vw, 0.0, m, old_logprobs=old, ref_logprobs=ref, kl_coef=0.05, lam=0.9)
    want, _ = dk.fused_policy_loss(ph, w, tgt, old, adv, m, clip_high=0.28)
    torch.testing.assert_close(loss, want)
    assert "advantages_mean" in metrics and "kl" not in metrics
    loss_kl, metrics_kl = dk.dvpo_loss(ph, w, tgt, old, m, gh, vw, 0.0, ref_logprobs=ref, kl_coef=0.05,
                                       kl_in="loss")
    adv0, _, _ = dk.dvpo_advantages(gh, vw, 0.0, m)
    want_kl, _ = dk.fused_policy_loss(ph, w, tgt, old, adv0, m, ref_logprobs=ref, kl_coef=0.05)
    torch.testing.assert_close(loss_kl, want_kl)
    assert "kl" in metrics_kl
    dk.DVPOLoss(lam=0.9)(ph, w, tgt, old, m, gh, vw)[0].backward()
    assert ph.grad is not None and (ph.grad[~m] == 0).all()
