"""dvpo ppo: the clipped value loss, fused = unfused advantages, end to end from the example, resume."""
from __future__ import annotations

import pytest
import torch
from _stages import kill_after, metrics, run_stage
from test_dvpo import dvpo_overrides

import dvpo_kernels as dk
from dvpo.rl import unfused
from dvpo.stages.ppo import clipped_value_loss


def test_clipped_value_loss_matches_a_hand_computation():
    v = torch.tensor([[1.0, 0.5, 3.0], [0.0, -1.0, 9.0]])
    old = torch.tensor([[0.5, 0.5, 0.0], [0.4, 0.0, 0.0]])
    ret = torch.tensor([[2.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    loss, frac = clipped_value_loss(v, old, ret, mask, 0.2, normalizer=4.0)
    # clipped values: 0.7, 0.5 | 0.2, -0.2
    terms = [max((1.0 - 2.0) ** 2, (0.7 - 2.0) ** 2), max(0.25, 0.25),
             max(1.0, (0.2 + 1.0) ** 2), max(4.0, (-0.2 - 1.0) ** 2)]
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 4.0)
    assert frac.item() == pytest.approx(2 / 4)


def test_fused_gae_and_whitening_match_the_python_loop():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 1, 7, 3])
    mask = torch.arange(7)[None] < lengths[:, None]
    values, old, ref = (torch.randn(4, 7, generator=g) for _ in range(3))
    rewards = unfused.kl_rewards(mask, old, ref, 0.1, torch.tensor([1.0, -1.0, 0.5, 2.0]))
    assert rewards[1, 0] == pytest.approx(-0.1 * (old[1, 0] - ref[1, 0]).item() - 1.0, abs=1e-6)
    values = values * mask
    adv, ret = dk.gae(values, rewards, mask, gamma=0.99, lam=0.9)
    adv2, ret2 = unfused.loop_gae(values, rewards, mask, 0.99, 0.9)
    torch.testing.assert_close(adv, adv2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, ret2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dk.masked_whiten(adv, mask), unfused.whiten(adv2, mask), rtol=1e-5, atol=1e-6)


def ppo_overrides(sft_model, reward_model, **extra):
    kw = dvpo_overrides(sft_model, reward_model, **extra)
    kw.pop("gvm.path")
    return {**kw, "reward.path": str(reward_model), "critic.lr": "1e-3"}


def test_ppo_runs_from_the_example_fused_and_unfused_and_resumes(sft_model, gvm_model, tmp_path):
    # A GVM folder has the reward model's format (a token value model); dvpo rm writes the same kind.
    kw = ppo_overrides(sft_model, gvm_model, **{"train.max_steps": "4", "train.save_every": "2",
                                                "train.save_total_limit": "0", "critic.warmup_steps": "1"})
    results = run_stage("ppo", "ppo_tiny", tmp_path / "fused", **kw)
    rows = metrics(tmp_path / "fused")
    assert "actor/pg_loss" not in rows[0] and "critic/vf_loss" in rows[0]  # step 1 warms the critic up
    assert {"actor/pg_loss", "critic/vf_loss", "critic/vf_clipfrac", "critic/score/mean", "timing_s/update_critic",
            "timing_s/update_actor"} <= set(rows[1])
    assert "eval/rm_score" in results and (tmp_path / "fused" / "final" / "critic" / "model.safetensors").is_file()
    unf = run_stage("ppo", "ppo_tiny", tmp_path / "unfused", **kw, **{"actor.kernels": "unfused"})
    a = [r for r in rows if "critic/vf_loss" in r]
    b = [r for r in metrics(tmp_path / "unfused") if "critic/vf_loss" in r]
    for ra, rb in zip(a, b):  # same samples, same numbers up to float rounding
        for k in ("critic/vf_loss", "critic/returns/mean", "critic/score/mean", "actor/entropy"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-5), k
    assert unf.keys() == results.keys()
    kill_after(tmp_path / "fused", 2)
    run_stage("ppo", "ppo_tiny", tmp_path / "fused", **kw)
    drop = ("time", "timing_s/", "perf/")
    clean = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in metrics(tmp_path / "fused")] == clean
