"""The native backend (csrc/): C++ twins on CPU against the float64 oracle and the torch
backend; the CUDA kernels on the same checks plus large shapes under ``-m gpu``.

The extension is built by ``pip install -e . --no-build-isolation``; when it is missing the
tests compile it just in time, or skip with the reason when no compiler works.
"""
import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import _backends, native_backend
from dvpo_kernels import reference as R
from dvpo_kernels import torch_backend as TB

from _helpers import rel_err

NATIVE = dict(backend="native")


@pytest.fixture(scope="module", autouse=True)
def native_built():
    if native_backend.unsupported(torch.device("cpu")) is not None:
        try:
            native_backend.build()
        except RuntimeError as e:
            pytest.skip(f"the native extension is not built and cannot be compiled here: {e}")


def _mask(b, t, seed=0, p=0.35):
    """Random holes, row 0 empty, row 2 (if any) full."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=g) > p
    m[0] = False
    if b > 2:
        m[2] = True
    return m


def _randn(*shape, seed=0, dtype=torch.float64, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def _adv_inputs(b, t, h, dtype, device="cpu", seed=0):
    hidden = _randn(b, t, h, seed=seed, dtype=dtype, device=device)
    weight = _randn(h, seed=seed + 1, dtype=dtype, device=device, scale=h ** -0.5)
    mask = _mask(b, t, seed=seed + 2).to(device)
    old = _randn(b, t, seed=seed + 3, device=device) - 2
    ref = _randn(b, t, seed=seed + 4, device=device) - 2
    score = _randn(b, seed=seed + 5, device=device)
    return hidden, weight, mask, old, ref, score


def _within_eager(got, eager, oracle, slack):
    """DESIGN §5: the fast path's error is at most the same-dtype eager error plus `slack`."""
    assert rel_err(got, oracle) <= rel_err(eager, oracle) + slack, (rel_err(got, oracle), rel_err(eager, oracle))


# --- C++ twins on CPU ----------------------------------------------------------------------

def test_backend_is_available_and_auto_picks_it_for_advantage_ops():
    cpu = torch.device("cpu")
    assert dk.backend_report(cpu)["native"] is None
    for op in ("value_head", "gae", "masked_whiten", "dvpo_advantages"):
        assert _backends.resolve(op, "auto", cpu) == "native"


def test_unbuilt_extension_is_reported_not_crashed(monkeypatch):
    monkeypatch.setattr(native_backend, "_ext", None)
    monkeypatch.setattr(native_backend, "_why", "the extension dvpo_kernels._C is not built (test)")
    assert "not built (test)" in dk.backend_report(torch.device("cpu"))["native"]
    with pytest.raises(RuntimeError, match=r"not built \(test\)"):
        dk.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), backend="native")
    assert _backends.resolve("gae", "auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("n,h", [(1, 48), (3, 200), (127, 48), (1000, 17)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_value_head(n, h, dtype):
    hidden = _randn(n, h, dtype=dtype)
    weight = _randn(1, h, seed=1, dtype=dtype)
    bias = _randn(1, seed=2, dtype=dtype)
    got = dk.value_head(hidden, weight, bias, **NATIVE)
    want = R.value_head(hidden, weight, bias)  # float64 of the same (rounded) inputs
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(got, want) < (1e-12 if dtype == torch.float64 else 2e-6)
    assert rel_err(dk.value_head(hidden, weight, **NATIVE), R.value_head(hidden, weight)) < 2e-6


@pytest.mark.parametrize("b,t", [(1, 1), (3, 17), (3, 257), (5, 64)])
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7), (0.99, 0.0), (0.97, 1.0)])
def test_gae_matches_oracle(b, t, gamma, lam):
    v, r = _randn(b, t), _randn(b, t, seed=1)
    m = _mask(b, t)
    a, ret = dk.gae(v, r, m, gamma=gamma, lam=lam, **NATIVE)
    ra, rr = R.gae(v, r, m, gamma, lam)
    assert a.dtype == torch.float64
    assert rel_err(a, ra) < 1e-12 and rel_err(ret, rr) < 1e-12
    assert (a[~m] == 0).all() and (ret[~m] == 0).all()
    a32, ret32 = dk.gae(v.float(), r.float(), m, gamma=gamma, lam=lam, **NATIVE)
    ea, er = TB.gae(v.float(), r.float(), m, gamma, lam)
    _within_eager(a32, ea, ra, 1e-5)
    _within_eager(ret32, er, rr, 1e-5)


def test_gae_lambda_identities_with_holes():
    b, t, gamma = 4, 29, 0.93
    v, r = _randn(b, t, seed=3), _randn(b, t, seed=4)
    m = _mask(b, t, seed=5)
    a1, ret1 = dk.gae(v, r, m, gamma=gamma, lam=1.0, **NATIVE)
    a0, _ = dk.gae(v, r, m, gamma=gamma, lam=0.0, **NATIVE)
    for row in range(b):
        idx = m[row].nonzero().flatten().tolist()
        rtg = 0.0
        for k in reversed(range(len(idx))):
            t_k = idx[k]
            rtg = float(r[row, t_k]) + gamma * rtg  # lam=1: A = discounted return-to-go - V
            assert abs(float(a1[row, t_k]) - (rtg - float(v[row, t_k]))) < 1e-10
            assert abs(float(ret1[row, t_k]) - rtg) < 1e-10
            v_next = float(v[row, idx[k + 1]]) if k + 1 < len(idx) else 0.0  # lam=0: A = TD error
            assert abs(float(a0[row, t_k]) - (float(r[row, t_k]) + gamma * v_next - float(v[row, t_k]))) < 1e-12


@pytest.mark.parametrize("shape", [(1,), (3, 17), (4, 257), (2, 3, 5)])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shape, shift_mean):
    x = _randn(*shape, scale=3.0) + 2
    m = _mask(shape[0], int(torch.tensor(shape[1:]).prod()), seed=6).reshape(shape)
    m.view(-1)[-1] = True  # at least one valid entry
    got = dk.masked_whiten(x, m, shift_mean=shift_mean, **NATIVE)
    want = R.masked_whiten(x, m, shift_mean=shift_mean)
    assert rel_err(got, want) < 1e-12
    assert (got[~m] == 0).all()
    got32 = dk.masked_whiten(x.float(), m, shift_mean=shift_mean, **NATIVE)
    _within_eager(got32, TB.masked_whiten(x.float(), m, shift_mean, 1e-8), want, 1e-5)
    assert (dk.masked_whiten(x, torch.zeros_like(m), **NATIVE) == 0).all()
    one = torch.zeros_like(m)
    one.view(-1)[0] = True  # one valid entry: variance denominator max(count-1, 1)
    assert torch.isfinite(dk.masked_whiten(x, one, **NATIVE)).all()


def test_masked_whiten_per_row_twin():
    x, m = _randn(5, 33, seed=7), _mask(5, 33, seed=8)
    for shift in (True, False):
        got = native_backend.masked_whiten(x, m, shift, 1e-8, dim=1)
        torch.testing.assert_close(got, TB.masked_whiten(x, m, shift, 1e-8, dim=1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dim"):
        native_backend.masked_whiten(x, m, True, 1e-8, dim=0)


@pytest.mark.parametrize("value_norm", ["seq", "batch", "none"])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("kl", [True, False])
def test_dvpo_advantages_fp64_matches_oracle(value_norm, whiten, kl):
    hidden, weight, mask, old, ref, score = _adv_inputs(3, 17, 48, torch.float64)
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.05) if kl else {}
    got = dk.dvpo_advantages(hidden, weight, 0.3, mask, score=score, gamma=0.99, lam=0.9, value_norm=value_norm,
                             whiten_advantages=whiten, **kw, **NATIVE)
    want = R.dvpo_advantages(hidden, weight, 0.3, mask, old if kl else None, ref if kl else None,
                             0.05 if kl else 0.0, score, 0.99, 0.9, value_norm, whiten)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        assert rel_err(g, w) < 1e-12
        assert (g[~mask] == 0).all()


@pytest.mark.parametrize("b,t,h", [(1, 1, 48), (3, 17, 200), (3, 257, 48), (1, 257, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value_norm", ["seq", "batch", "none"])
def test_dvpo_advantages_low_precision(b, t, h, dtype, value_norm):
    hidden, weight, mask, old, ref, score = _adv_inputs(b, t, h, dtype, seed=b + t)
    kw = dict(old_logprobs=old.float(), ref_logprobs=ref.float(), kl_coef=0.1, score=score.float(), gamma=0.995,
              lam=0.95, value_norm=value_norm)
    got = dk.dvpo_advantages(hidden, weight, None, mask, **kw, **NATIVE)
    eager = dk.dvpo_advantages(hidden, weight, None, mask, **kw, backend="torch")
    want = R.dvpo_advantages(hidden, weight, None, mask, kw["old_logprobs"], kw["ref_logprobs"], 0.1, kw["score"],
                             0.995, 0.95, value_norm, True)
    for g, e, w in zip(got, eager, want):
        assert g.dtype == torch.float32 and g.shape == (b, t)
        _within_eager(g, e, w, 1e-5 if dtype == torch.float32 else 1e-2)


def test_score_lands_on_the_last_valid_token():
    b, t = 3, 11
    hidden = torch.zeros(b, t, 8, dtype=torch.float64)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[1, [2, 5, 6]] = True  # trailing holes after the last valid token (t=6)
    mask[2] = True
    score = torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64)
    adv, ret, values = dk.dvpo_advantages(hidden, torch.zeros(8, dtype=torch.float64), None, mask, score=score,
                                          gamma=1.0, lam=1.0, value_norm="none", whiten_advantages=False, **NATIVE)
    assert (values == 0).all() and (adv[0] == 0).all()  # row 0 empty: its score goes nowhere
    assert adv[1, 6] == 2.0 and adv[1, 2] == 2.0 and adv[1, 7:].abs().sum() == 0
    assert torch.equal(adv[2], torch.full((t,), -1.0, dtype=torch.float64))
    torch.testing.assert_close(ret, adv)


def test_many_chunks_and_thread_count_independence():
    hidden, weight, mask, old, ref, score = _adv_inputs(4, 12000, 8, torch.float32, seed=9)
    kw = dict(old_logprobs=old.float(), ref_logprobs=ref.float(), kl_coef=0.02, score=score.float(), value_norm="batch")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dk.dvpo_advantages(hidden, weight, 0.1, mask, **kw, **NATIVE)
        torch.set_num_threads(2)
        two = dk.dvpo_advantages(hidden, weight, 0.1, mask, **kw, **NATIVE)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, two):
        assert torch.equal(x, y)
    eager = dk.dvpo_advantages(hidden, weight, 0.1, mask, **kw, backend="torch")
    exact = dk.dvpo_advantages(hidden.double(), weight.double(), 0.1, mask, **{**kw, "old_logprobs": old,
                                                                                "ref_logprobs": ref, "score": score},
                               **NATIVE)
    for g, e, w in zip(two, eager, exact):
        _within_eager(g, e, w, 1e-5)


# --- CUDA kernels ----------------------------------------------------------------------------

def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    why = native_backend.unsupported(torch.device("cuda"))
    if why is not None:
        pytest.skip(f"the native CUDA kernels are not available on this GPU machine: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("b,t,h", [(1, 1, 48), (3, 17, 200), (3, 257, 48), (5, 1500, 200)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value_norm", ["seq", "batch", "none"])
def test_cuda_dvpo_advantages_odd_shapes(b, t, h, dtype, value_norm):
    _cuda_or_skip()
    hidden, weight, mask, old, ref, score = _adv_inputs(b, t, h, dtype, seed=t)
    kw = dict(kl_coef=0.1, gamma=0.99, lam=0.95, value_norm=value_norm)
    f = lambda x: x if dtype == torch.float64 else x.float()  # noqa: E731
    got = dk.dvpo_advantages(hidden.cuda(), weight.cuda(), torch.tensor(0.2, device="cuda", dtype=dtype),
                             mask.cuda(), old_logprobs=f(old).cuda(), ref_logprobs=f(ref).cuda(), score=f(score).cuda(),
                             **kw, **NATIVE)
    eager = dk.dvpo_advantages(hidden, weight, 0.2, mask, old_logprobs=f(old), ref_logprobs=f(ref), score=f(score),
                               **kw, backend="torch")
    want = R.dvpo_advantages(hidden, weight, 0.2, mask, f(old), f(ref), 0.1, f(score), 0.99, 0.95, value_norm, True)
    for g, e, w in zip(got, eager, want):
        if dtype == torch.float64:
            assert rel_err(g, w) < 1e-10
        else:
            _within_eager(g, e, w, 1e-5 if dtype == torch.float32 else 1e-2)
        assert (g.cpu()[~mask] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("b,t", [(1, 1), (3, 17), (4, 1000), (2, 5000)])
def test_cuda_gae_and_whiten(b, t):
    _cuda_or_skip()
    v, r, m = _randn(b, t), _randn(b, t, seed=1), _mask(b, t)
    for gamma, lam in ((1.0, 0.95), (0.97, 1.0), (0.9, 0.0)):
        a, ret = dk.gae(v.cuda(), r.cuda(), m.cuda(), gamma=gamma, lam=lam, **NATIVE)
        ra, rr = R.gae(v, r, m, gamma, lam)
        assert rel_err(a, ra) < 1e-10 and rel_err(ret, rr) < 1e-10
    x = _randn(b, t, seed=2, scale=3.0) + 1
    for shift in (True, False):
        assert rel_err(dk.masked_whiten(x.cuda(), m.cuda(), shift_mean=shift, **NATIVE),
                       R.masked_whiten(x, m, shift_mean=shift)) < 1e-10
        per_row = native_backend.masked_whiten(x.cuda(), m.cuda(), shift, 1e-8, dim=1)
        assert rel_err(per_row, TB.masked_whiten(x, m, shift, 1e-8, dim=1)) < 1e-10
    h, w = _randn(b * t, 200, seed=3, dtype=torch.bfloat16), _randn(200, seed=4, dtype=torch.bfloat16)
    assert rel_err(dk.value_head(h.cuda(), w.cuda(), **NATIVE), R.value_head(h, w)) < 2e-6


@pytest.mark.gpu
@pytest.mark.parametrize("b,t", [(2, 131072), (4096, 64)])
def test_cuda_large_shapes_bf16(b, t):
    _cuda_or_skip()
    h = 64
    hidden, weight, mask, old, ref, score = _adv_inputs(b, t, h, torch.bfloat16, seed=11)
    mask[:, : t // 3] &= torch.rand(b, t // 3) > 0.9  # rows with long holes of different lengths
    kw = dict(kl_coef=0.05, gamma=1.0, lam=0.95)
    got = dk.dvpo_advantages(hidden.cuda(), weight.cuda(), None, mask.cuda(), old_logprobs=old.float().cuda(),
                             ref_logprobs=ref.float().cuda(), score=score.float().cuda(), **kw, **NATIVE)
    # The C++ twin in float64 on the same bf16-rounded inputs is the oracle here (verified above).
    want = dk.dvpo_advantages(hidden.double(), weight.double(), None, mask, old_logprobs=old.float().double(),
                              ref_logprobs=ref.float().double(), score=score.float().double(), **kw, **NATIVE)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-4


@pytest.mark.gpu
def test_cuda_no_host_sync():
    _cuda_or_skip()
    hidden, weight, mask, old, ref, score = (x.cuda() for x in _adv_inputs(8, 300, 128, torch.bfloat16))
    old, ref, score = old.float(), ref.float(), score.float()
    bias = torch.tensor(0.1, device="cuda", dtype=torch.bfloat16)
    dk.dvpo_advantages(hidden, weight, bias, mask, **NATIVE)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for value_norm in ("seq", "batch", "none"):
            dk.dvpo_advantages(hidden, weight, bias, mask, old_logprobs=old, ref_logprobs=ref, kl_coef=0.1,
                               score=score, value_norm=value_norm, **NATIVE)
        dk.gae(old, ref, mask, **NATIVE)
        dk.masked_whiten(old, mask, **NATIVE)
        dk.value_head(hidden, weight, bias, **NATIVE)
    finally:
        torch.cuda.set_sync_debug_mode("default")
