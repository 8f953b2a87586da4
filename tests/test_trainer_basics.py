"""dvpo.trainer: schedule, resumable batches, atomic checkpoints and rotation, optimizer groups."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dvpo.trainer import (
    Checkpointer,
    EpochBatches,
    TrainConfig,
    atomic_directory,
    build_optimizer,
    build_scheduler,
    latest_checkpoint,
    list_checkpoints,
    lr_multiplier,
    resolve_resume,
)


def test_lr_schedule_warmup_then_decay():
    assert [lr_multiplier(u, 10, 2, "cosine", 0.0) for u in (0, 1)] == [0.5, 1.0]
    assert lr_multiplier(2, 10, 2, "cosine", 0.0) == 1.0
    assert lr_multiplier(6, 10, 2, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(9, 10, 0, "constant", 0.0) == 1.0


def test_optimizer_skips_decay_on_vectors_and_scheduler_steps():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cfg = TrainConfig(lr=0.1, weight_decay=0.01, warmup_steps=2)
    opt = build_optimizer(model, cfg)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    sched = build_scheduler(opt, cfg, total_updates=4)
    assert sched.get_last_lr()[0] == pytest.approx(0.05)
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)


def test_epoch_batches_resume_where_they_stopped():
    a = EpochBatches(10, 3, seed=1)
    seen = [a.next() for _ in range(5)]  # 3 batches per epoch: the 4th starts epoch 1
    assert all(len(b) == 3 for b in seen) and len(set(sum(seen[:3], []))) == 9
    b = EpochBatches(10, 3, seed=1)
    for _ in range(2):
        b.next()
    c = EpochBatches(10, 3, seed=1)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert [c.next() for _ in range(3)] == seen[2:]
    assert a.steps_for(1.5) == 5
    with pytest.raises(ValueError, match="larger than"):
        EpochBatches(2, 3, seed=0)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "final"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_directory(target) as tmp:  # replacing an existing folder
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"] and len(list(tmp_path.iterdir())) == 1


def test_checkpoints_roundtrip_rotate_and_resolve(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    cfg = TrainConfig(lr=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    ckpt = Checkpointer(tmp_path, save_total_limit=2)
    for step in (1, 2, 3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ckpt.save(step, model=model, optimizer=opt, scheduler=sched, state={"batches": {"epoch": 0, "position": step}})
    (tmp_path / "global_step_9").mkdir()  # an incomplete folder (no trainer_state.json) is ignored
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert latest_checkpoint(tmp_path).name == "global_step_3"
    assert resolve_resume("none", tmp_path) is None
    with pytest.raises(ValueError, match="not a checkpoint"):
        resolve_resume(str(tmp_path / "global_step_9"), tmp_path)

    expected_next = torch.rand(3)  # the RNG stream after the save is restored by load
    fresh = nn.Linear(3, 2)
    opt2 = build_optimizer(fresh, cfg)
    sched2 = build_scheduler(opt2, cfg, 10)
    state = Checkpointer.load(latest_checkpoint(tmp_path), model=fresh, optimizer=opt2, scheduler=sched2)
    assert state == {"step": 3, "batches": {"epoch": 0, "position": 3}}
    torch.testing.assert_close(fresh.weight, model.weight)
    assert sched2.last_epoch == 3 and opt2.state_dict()["state"][0]["step"] == 3
    torch.testing.assert_close(torch.rand(3), expected_next)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight  # tied, as in most causal LMs


def test_async_checkpoint_holds_the_state_at_save_time(tmp_path):
    torch.manual_seed(0)
    model, cfg = _Tied(), TrainConfig(lr=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    model.head(model.embed(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, scheduler=sched, state={"batches": {}})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    with torch.no_grad():  # training goes on while the checkpoint is written
        model.embed.weight.add_(1.0)
        opt.state_dict()["state"][0]["exp_avg"].add_(1.0)
    ckpt.wait()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    fresh = _Tied()
    opt2 = build_optimizer(fresh, cfg)
    Checkpointer.load(tmp_path / "global_step_1", model=fresh, optimizer=opt2, scheduler=build_scheduler(opt2, cfg, 10))
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    torch.testing.assert_close(opt2.state_dict()["state"][0]["exp_avg"], saved_avg)


def test_async_checkpoint_failure_is_raised_and_leaves_no_folder(tmp_path, monkeypatch):
    import dvpo.trainer.checkpoint as checkpoint

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken)
    model, cfg = nn.Linear(2, 2), TrainConfig()
    opt = build_optimizer(model, cfg)
    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, model=model, optimizer=opt, scheduler=build_scheduler(opt, cfg, 1), state={})
    with pytest.raises(RuntimeError, match="background") as info:
        ckpt.wait()
    assert "disk full" in str(info.value.__cause__)
    assert list(tmp_path.iterdir()) == []
    ckpt.wait()  # reported once
