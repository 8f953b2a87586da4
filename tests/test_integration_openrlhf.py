"""dvpo_kernels.integrations.openrlhf.PolicyLoss against OpenRLHF's own PolicyLoss: loss, gradients and
every output, token- and sequence-level aggregation, dual clip, and the train/rollout IS correction."""
from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from dvpo_kernels.integrations.openrlhf import PolicyLoss


@pytest.fixture(scope="module")
def openrlhf_loss():
    """``openrlhf.models.loss``, loaded without ``openrlhf.models.__init__`` (its Actor needs flash-attn and
    a CUDA DeepSpeed); ``deepspeed`` is stubbed when absent: loss.py's sibling utils.py imports it at the top
    and uses it only in functions we do not call."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("OpenRLHF is not installed (.ci/install_frameworks)")
    root = spec.submodule_search_locations[0]
    saved = {k: sys.modules.get(k) for k in ("openrlhf", "openrlhf.models", "deepspeed")}
    try:
        for name, path in (("openrlhf", root), ("openrlhf.models", f"{root}/models")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        if importlib.util.find_spec("deepspeed") is None:
            sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        loss_spec = importlib.util.spec_from_file_location("openrlhf.models.loss", f"{root}/models/loss.py")
        module = importlib.util.module_from_spec(loss_spec)
        loss_spec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        sys.modules.pop("openrlhf.models.utils", None)
    return module


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(4, 9, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(4, 9, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(4, 9, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=g) > 0.3
    mask[2] = False
    rollout = old + 0.5 * torch.randn(4, 9, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, rollout


CASES = [
    dict(),
    dict(clip_eps_low=0.1, clip_eps_high=0.3, dual_clip=3.0),
    dict(token_level_loss=False),
    dict(is_correction_level="token", is_correction_mode="clip"),
    dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.8, 1.5)),
    dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.8, 1.25)),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("totals", [{}, {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 6}])
def test_matches_openrlhf_policy_loss(openrlhf_loss, kw, totals):
    logp, old, adv, mask, rollout = _batch()
    if kw.get("is_correction_level") == "seq":
        mask[2] = mask[0]  # OpenRLHF's 0/0 mean counts an empty row as filtered; ours does not
    theirs = openrlhf_loss.PolicyLoss(**kw)(logp, old, adv, mask.double(), rollout, **totals)
    (g_ref,) = torch.autograd.grad(theirs[0], logp)
    ours = PolicyLoss(**kw)(logp, old, adv, mask, rollout, **totals)
    (g,) = torch.autograd.grad(ours[0], logp)
    torch.testing.assert_close(ours[0].double(), theirs[0], rtol=1e-7, atol=1e-10)
    # the frameworks' seq-mean divides by count + 1e-8
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-10)
    for a, b in zip(ours[1:], theirs[1:]):
        assert (a is None) == (b is None)
        if a is not None:
            assert float(a) == pytest.approx(float(b), rel=1e-6, abs=1e-9)
    assert g[~mask].abs().max() == 0


def test_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="policy_loss_type"):
        PolicyLoss(policy_loss_type="gspo")
    with pytest.raises(ValueError, match="is_correction_gating"):
        PolicyLoss(is_correction_level="token", is_correction_gating="tv")
    logp, old, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="rollout_log_probs"):
        PolicyLoss(is_correction_level="token")(logp, old, adv, mask)
