"""A bf16 run, phase by phase: which dtype every matmul, the dvpo_kernels ops and the optimizer see (the table
in the README's "Precision" section)."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from _stages import HH, run_stage
from torch.utils._python_dispatch import TorchDispatchMode

from dvpo.rl import Timer
from dvpo.rl import actor as actor_module

GEMMS = {"mm", "addmm", "bmm", "baddbmm"}


class PhaseDtypes(TorchDispatchMode):
    """Per phase (the innermost timer), the dtypes of the operands of every GEMM and of the hidden/weight
    operands of every dvpo_kernels op."""

    def __init__(self, phases: list[str]):
        super().__init__()
        self.phases, self.seen = phases, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if self.phases and (name.startswith("dvpo::") or name.split("::")[-1] in GEMMS):
            key = name if name.startswith("dvpo::") else "gemm"
            operands = [a for a in args[:2] if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if key == "gemm" and len(operands) == 2 and operands[0].shape[-1] == 1:
                # an outer product: RoPE's angle table (positions x inverse frequencies), kept in fp32 by
                # design; transformers 4.x writes it as a bmm
                return func(*args, **(kwargs or {}))
            self.seen.setdefault(self.phases[-1], {}).setdefault(key, set()).update(a.dtype for a in operands)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")
def test_a_bf16_dvpo_step_computes_in_bf16_with_fp32_weights_statistics_and_optimizer(sft_model, gvm_model,
                                                                                      tmp_path, monkeypatch):
    phases: list[str] = []
    timed = Timer.__call__

    @contextmanager
    def tagged(self, name):
        phases.append(name)
        try:
            with timed(self, name):
                yield
        finally:
            phases.pop()

    updates = []
    apply = actor_module.apply_update

    def recorded(params, optimizer, *a, **kw):
        updates.append({p.dtype for p in params} | {p.grad.dtype for p in params if p.grad is not None})
        out = apply(params, optimizer, *a, **kw)
        updates[-1] |= {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim() > 0}
        return out

    monkeypatch.setattr(Timer, "__call__", tagged)
    monkeypatch.setattr(actor_module, "apply_update", recorded)
    spy = PhaseDtypes(phases)
    with spy:
        run_stage("dvpo", "dvpo_tiny", tmp_path, **{
            "train.progress_bar": "false", "model.path": str(sft_model), "gvm.path": str(gvm_model),
            "data.prompts": str(HH), "data.limit": "16", "data.max_prompt_length": "24",
            "data.eval_fraction": "0", "rollout.max_new_tokens": "5", "train.batch_size": "4",
            "actor.mini_batch_size": "2", "train.max_steps": "1", "train.save_every": "0",
            "train.precision": "bf16"})
    bf16, fp32 = {torch.bfloat16}, {torch.float32}
    seen = spy.seen
    # every transformer matmul of every phase runs in bf16: sampling, both log-prob passes, the GVM, the update
    for phase in ("gen", "old_log_prob", "ref", "values", "update_actor"):
        assert seen[phase]["gemm"] == bf16, (phase, seen[phase])
    # the LM-head ops get bf16 operands under autocast, as F.linear would (statistics come back fp32)
    assert seen["old_log_prob"]["dvpo::linear_logprobs"] == bf16
    assert seen["ref"]["dvpo::linear_logprobs"] == bf16
    assert seen["update_actor"]["dvpo::fused_policy_loss"] == bf16
    # values are statistics: the GVM head and the advantage recipe compute in fp32
    assert seen["values"]["dvpo::value_head"] == fp32
    assert seen["adv"]["dvpo::dvpo_advantages"] == fp32 and "gemm" not in seen["adv"]
    # fp32 master weights, gradients and AdamW moments
    assert updates and all(u == fp32 for u in updates), updates
