"""Run by ``torchrun --nproc_per_node 2`` from test_distributed.py: a short dvpo run, then a check that
every rank holds the same full weights. Args: output dir, train.parallel (``fsdp+frozen``: also shard the
frozen reference and GVM), sft folder, gvm folder, HH file. Or: output dir, ``stage``, stage name,
example name, JSON overrides: that stage's run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import dvpo_kernels as dk
from dvpo.config import load_config
from dvpo.rl import batch_whiten
from dvpo.stages import dvpo as dvpo_stage
from dvpo.stages import rl_setup
from dvpo.trainer import parallel


def parallel_kind(model: torch.nn.Module) -> str:
    """``fsdp`` (sharded: the model or its submodules) or ``replicate``."""
    return "fsdp" if parallel.is_sharded(model) else "replicate"


def main(out: str, mode: str, sft: str, gvm: str, hh: str) -> None:
    captured = {}
    build = rl_setup.trainable_policy

    def capture(*args, **kwargs):
        captured["policy"] = build(*args, **kwargs)
        return captured["policy"]

    rl_setup.trainable_policy = capture
    overrides = {"train.output_dir": out, "train.parallel": mode.split("+")[0],  # +frozen, +lora
                 "train.shard_frozen": str(mode.endswith("+frozen")), "train.progress_bar": "false",
                 "train.device": "cpu", "model.path": sft, "gvm.path": gvm, "data.prompts": hh, "data.limit": "40",
                 "data.max_prompt_length": "24", "data.eval_size": "3", "data.eval_fraction": "0.075", "rollout.max_new_tokens": "6",
                 "train.batch_size": "4", "actor.mini_batch_size": "2", "train.max_steps": "2",
                 "train.save_every": "2", "train.lr": "1e-3", "model.lora_r": "4" if mode.endswith("+lora") else "0"}
    cfg = load_config(dvpo_stage.DVPOStageConfig, None, list(overrides.items()))
    dvpo_stage.run(cfg)
    policy = captured["policy"]
    # every rank gathers the full weights (full_model_state keeps them on rank 0 only)
    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True))
    flat = torch.cat([v.detach().float().reshape(-1).cpu() for _, v in sorted(state.items())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    # whitening over the global batch equals whitening the concatenation of every rank's rows
    g = torch.Generator().manual_seed(dist.get_rank())
    x, mask = torch.randn(3 + dist.get_rank(), 5, generator=g), torch.rand(3 + dist.get_rank(), 5, generator=g) > 0.3
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (x, mask, batch_whiten(x, mask)))
    whole = dk.masked_whiten(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    whiten_error = float((torch.cat([r[2] for r in rows]) - whole).abs().max())
    if dist.get_rank() == 0:
        spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
        (Path(out) / "ranks.json").write_text(json.dumps({"max_rank_difference": spread,
                                                          "parallel": parallel_kind(policy),
                                                          "world_size": dist.get_world_size(),
                                                          "whiten_error_below_1e-5": whiten_error < 1e-5}))
    dist.destroy_process_group()
    _exit()


def run_stage(out: str, stage: str, example: str, overrides: str) -> None:
    """``dvpo <stage> examples/<example>.yaml`` with ``overrides`` (JSON); rank 0 records which of the trained
    models were FSDP2-sharded."""
    from _stages import stage_config

    from dvpo.stages import STAGES
    from dvpo.trainer import Trainer

    trained = []
    init = Trainer.__init__

    def capture(self, cfg, *, model, **kwargs):
        trained.append(model)
        init(self, cfg, model=model, **kwargs)

    Trainer.__init__ = capture
    STAGES[stage].run(stage_config(stage, example, Path(out), **json.loads(overrides)))
    if dist.get_rank() == 0:
        state = {"world_size": dist.get_world_size(), "parallel": parallel_kind(trained[0])}
        (Path(out) / "ranks.json").write_text(json.dumps(state))
    dist.destroy_process_group()
    _exit()


def _exit() -> None:
    """Leave without interpreter teardown once the results are written: on rare runs a torch background
    thread aborted the process there ("terminate called without an active exception") after all work."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[2] == "stage":
        run_stage(sys.argv[1], *sys.argv[3:])
    else:
        main(*sys.argv[1:])
