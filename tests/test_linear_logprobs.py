import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import reference as R

from _helpers import LargestTensor, make_lm_inputs, rel_err


@pytest.fixture
def small_blocks():
    """Shrink the block budget so every shape spans several token chunks and vocab slices."""
    from dvpo_kernels import _config

    old_block, old_slice = _config.MAX_BLOCK_ELEMENTS, _config.LEAN_VOCAB_SLICE
    _config.MAX_BLOCK_ELEMENTS, _config.LEAN_VOCAB_SLICE = 4096, 97
    yield
    _config.MAX_BLOCK_ELEMENTS, _config.LEAN_VOCAB_SLICE = old_block, old_slice


@pytest.mark.parametrize("n,h,v", [(1, 48, 301), (3, 200, 131), (127, 48, 301), (1000, 48, 257)])
@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_values_and_grads_match_oracle(n, h, v, memory, small_blocks):
    hidden, weight, bias, tgt = make_lm_inputs(n, h, v, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, temperature=0.7, return_entropy=True, memory=memory)
    grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight, bias))
    rlp, rent = R.linear_logprobs(hidden, weight, tgt, bias, 0.7)
    rgrads = torch.autograd.grad((rlp * g_lp.double()).sum() + (rent * g_ent.double()).sum(), (hidden, weight, bias))
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    assert rel_err(lp, rlp) < 2e-4 and rel_err(ent, rent) < 2e-4
    for got, want in zip(grads, rgrads):
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 2e-4


def test_batch_time_layout_and_no_bias():
    hidden, weight, _, tgt = make_lm_inputs(0, 48, 101, lead=(3, 7), bias=False, dtype=torch.float32)
    lp = dk.linear_logprobs(hidden, weight, tgt)
    assert lp.shape == (3, 7)
    rlp, _ = R.linear_logprobs(hidden, weight, tgt)
    assert rel_err(lp, rlp) < 2e-4
    assert (lp <= 0).all()


def test_gradcheck_float64(small_blocks):
    hidden, weight, bias, tgt = make_lm_inputs(5, 6, 23)
    for memory in ("speed", "lean"):
        fn = lambda h, w, b: dk.linear_logprobs(h, w, tgt, bias=b, temperature=1.3, return_entropy=True,
                                                memory=memory)
        assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_shift_invariance_of_logits():
    hidden, weight, bias, tgt = make_lm_inputs(33, 48, 211, dtype=torch.float32, grad=False)
    lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, return_entropy=True)
    lp2, ent2 = dk.linear_logprobs(hidden, weight, tgt, bias=bias + 50.0, return_entropy=True)
    torch.testing.assert_close(lp, lp2, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, ent2, rtol=1e-5, atol=1e-4)


def test_extreme_logits_stay_finite():
    hidden, weight, _, tgt = make_lm_inputs(9, 48, 64, dtype=torch.float32, grad=False, bias=False)
    lp, ent = dk.linear_logprobs(hidden * 1e4, weight, tgt, return_entropy=True)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all() and (lp <= 0).all()


@pytest.mark.parametrize("memory", ["speed", "lean"])
def test_never_allocates_n_by_v(memory):
    n, h, v = 512, 16, 1024
    hidden, weight, bias, tgt = make_lm_inputs(n, h, v, dtype=torch.float32)
    from dvpo_kernels import _config

    old = dk.set_max_block_elements(16 * v)
    try:
        with LargestTensor() as probe:
            lp, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, return_entropy=True, memory=memory)
            (lp.sum() + ent.sum()).backward()
            old_lp, adv = lp.detach() - 0.1, torch.randn(n)
            loss, _ = dk.fused_policy_loss(hidden, weight, tgt, old_lp, adv, torch.ones(n, dtype=torch.bool),
                                           bias=bias, entropy_coef=0.01, memory=memory)
            loss.backward()
    finally:
        dk.set_max_block_elements(old)
    assert probe.largest < n * v
    assert probe.largest <= max(16 * v, v * h, n * h)
    assert _config.MAX_BLOCK_ELEMENTS == old


def test_no_grad_path_and_bf16():
    hidden, weight, bias, tgt = make_lm_inputs(40, 48, 150, dtype=torch.bfloat16, grad=False)
    with torch.no_grad():
        lp = dk.linear_logprobs(hidden, weight, tgt, bias=bias)
    assert lp.dtype == torch.float32
    rlp, _ = R.linear_logprobs(hidden, weight, tgt, bias)
    eager = torch.log_softmax((hidden @ weight.T + bias).float(), -1).gather(1, tgt[:, None]).squeeze(1)
    assert rel_err(lp, rlp) <= rel_err(eager, rlp) + 1e-2
