"""dvpo_kernels.integrations.verl against verl's own functions: the clipped policy loss and every
loss_agg_mode, GAE, the DVPO advantage recipe, and the fused-forward contract (CausalLMOutputForPPO)."""
from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

if Version(transformers.__version__) < Version("5.5.3"):
    pytest.skip("verl 0.9.1 needs transformers>=5.5.3", allow_module_level=True)
core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (.ci/install_frameworks)")
import verl.utils.torch_functional as verl_F  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import dvpo_kernels.integrations.verl as dk_verl  # noqa: E402

MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _batch(b=5, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    mask[1] = 0  # an empty row
    weights = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    return old, logp, adv, mask, weights


def _config(**global_batch_info):
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.15, "clip_ratio_high": 0.28,
                             "clip_ratio_c": 3.0, "global_batch_info": global_batch_info})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("is_weights", [False, True])
@pytest.mark.parametrize("info", [{}, {"dp_size": 2, "batch_num_tokens": 57, "global_batch_size": 9,
                                      "loss_scale_factor": 16}])
def test_policy_loss_matches_verl_vanilla(mode, is_weights, info):
    old, logp, adv, mask, weights = _batch()
    w = weights if is_weights else None
    ref_loss, ref_metrics = core_algos.compute_policy_loss_vanilla(old, logp, adv, mask, mode, _config(**info), w)
    (g_ref,) = torch.autograd.grad(ref_loss, logp)
    loss, metrics = core_algos.get_policy_loss_fn("dvpo")(old, logp, adv, mask, mode, _config(**info), w)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-7, atol=1e-10)
    # the frameworks' seq-mean divides by count + 1e-8
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-6, abs=1e-9), k
    assert g[mask == 0].abs().max() == 0  # masked tokens get no gradient


def test_agg_options_reject_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        dk_verl.agg_options("token-max", torch.ones(2, 3))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_verl(gamma, lam):
    _, _, rewards, mask, values = _batch(4, 13, seed=int(gamma * 100 + lam * 10))
    adv_ref, ret_ref = dk_verl.verl_compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    # verl's gae branch calls the module attribute, which now runs our kernel
    adv, ret = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma, lam)
    on = mask.bool()
    torch.testing.assert_close(adv[on].double(), adv_ref[on], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ret[on].double(), ret_ref[on], rtol=1e-6, atol=1e-9)
    assert core_algos.get_adv_estimator_fn("gae") is dk_verl.compute_gae_advantage_return


def test_dvpo_recipe_is_verl_gae_on_row_whitened_values(monkeypatch):
    _, _, rewards, mask, values = _batch(4, 13, seed=3)
    mask[1, 4] = 1
    white = torch.stack([verl_F.masked_whiten(v, m) if m.sum() > 1 else v * 0 for v, m in zip(values, mask)])
    adv_ref, _ = dk_verl.verl_compute_gae_advantage_return(rewards, white, mask, 1.0, 0.95)
    adv, _ = core_algos.get_adv_estimator_fn("dvpo")(token_level_rewards=rewards, values=values,
                                                     response_mask=mask, gamma=1.0, lam=0.95)
    on = mask.bool()
    torch.testing.assert_close(adv[on].double(), adv_ref[on], rtol=1e-5, atol=1e-7)
    monkeypatch.setenv("DVPO_VALUE_NORM", "seq")  # what verl's gae branch runs in the recipe
    adv_branch, _ = core_algos.compute_gae_advantage_return(rewards, values, mask, 1.0, 0.95)
    torch.testing.assert_close(adv_branch, adv)


def _tiny_causal_lm(cls_name):
    from transformers import LlamaConfig, LlamaForCausalLM

    cls = type(cls_name, (LlamaForCausalLM,), {})  # a class of its own: verl patches the class forward
    cfg = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return cls(cfg).float()


def test_fused_forward_matches_verl_torch_backend():
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    ours, theirs = _tiny_causal_lm("OursLM"), _tiny_causal_lm("TheirsLM")
    theirs.load_state_dict(ours.state_dict())
    patch_forward_with_backends(ours, use_fused_kernels=True, fused_kernels_backend="dvpo")
    patch_forward_with_backends(theirs, use_fused_kernels=True, fused_kernels_backend="torch")
    assert type(ours).forward is dk_verl.forward_with_dvpo_backend
    # verl's remove-padding layout: [1, nnz] with position_ids restarting per sequence
    ids = torch.randint(0, 101, (1, 17))
    pos = torch.cat([torch.arange(9), torch.arange(8)])[None]
    shift = torch.roll(ids, -1, -1)
    for kw in ({"input_ids": ids}, {"input_ids": ids, "shift_labels": shift}):
        outs = []
        for m in (ours, theirs):
            m.zero_grad()
            o = m(**kw, position_ids=pos, temperature=0.7, return_dict=True, use_cache=False)
            (o.log_probs.sum() + 0.5 * o.entropy.sum()).backward()
            outs.append((o, {n: p.grad.clone() for n, p in m.named_parameters()}))
        (a, ga), (b, gb) = outs
        assert a.log_probs.shape == b.log_probs.shape == (1, 17) and a.log_probs.dtype == torch.float32
        torch.testing.assert_close(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6)
