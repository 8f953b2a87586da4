"""Micro-batches by token budget, and replicas' gradients averaged in buckets during backward (DDP's
scheme) over two gloo processes: equal to the mean of the ranks' full-batch gradients, with accumulation,
several buckets, a parameter only one rank uses and one no rank uses."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _stages import HH, TINY, needs_hh, run_stage
from safetensors.torch import load_file
from torch import nn

from dvpo.trainer import grad_sync, micro_batches


def test_micro_batches_by_count_are_consecutive():
    assert micro_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert micro_batches(3, 0) == [[0, 1, 2]]
    assert micro_batches(3, 2, tokens=[1, 2, 3], max_tokens=0) == [[0, 1], [2]]


def test_micro_batches_by_token_budget_group_similar_lengths_within_the_budget():
    tokens = [7, 3, 5, 5, 2, 8, 1, 9]
    groups = micro_batches(len(tokens), 2, tokens=tokens, max_tokens=10)
    # longest first: 9 | 8 | 7 | 5 5 | 3 2 1, each group's rows x longest row <= 10
    assert groups == [[7], [5], [0], [2, 3], [1, 4, 6]]
    assert all(len(g) * max(tokens[r] for r in g) <= 10 for g in groups)
    # a row longer than the budget runs on its own; a generous budget keeps one group
    assert micro_batches(3, 0, tokens=torch.tensor([50, 1, 1]), max_tokens=10) == [[0], [1, 2]]
    assert micro_batches(2, 0, tokens=[1, 1], max_tokens=1000) == [[0, 1]]
    with pytest.raises(ValueError, match="tokens"):
        micro_batches(3, 0, tokens=[1, 2], max_tokens=4)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"body": nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                                nn.Linear(16, 3)),
                          "extra": nn.Linear(6, 3),  # used by rank 1 only
                          "never": nn.Linear(2, 2)})  # used by no rank: keeps no gradient


def _loss(model: nn.Module, x: torch.Tensor, rank: int) -> torch.Tensor:
    out = model["body"](x).square().sum()
    return out + model["extra"](x).sum() if rank == 1 else out


def _data(rank: int) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float32)


def _worker(rank: int, store: str, results: dict) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        model = _model()
        params = list(model.parameters())
        grad_sync.replicate(params, cap_mb=0.001)  # about 1 KB: several buckets
        x = _data(rank)
        # ranks that need different numbers of micro-batches run as many as the rank that needs most
        lengths = [10, 10, 10, 10] if rank == 0 else [40, 1, 1, 1]
        results[f"groups{rank}"] = micro_batches(4, 0, tokens=lengths, max_tokens=40)
        for _ in range(2):  # two steps: the buckets reset after each
            for rows in grad_sync.micro_steps([list(range(0, 3)), list(range(3, 8))]):
                _loss(model, x[rows], rank).backward()
            grad_sync.average_gradients(params)
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            model.zero_grad(set_to_none=True)
        results[rank] = (grads, len(getattr(params[0], grad_sync._OWNER).buckets))
        # a backward that is not marked as accumulation after the last bucket launched is refused
        _loss(model, x[:2], rank).backward()
        try:
            _loss(model, x[2:4], rank).backward()
        except RuntimeError as e:
            results[f"error{rank}"] = str(e)
        grad_sync.average_gradients(params)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_bucketed_gradients_equal_the_mean_over_ranks(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    model = _model()
    for rank in range(2):
        _loss(model, _data(rank), rank).backward()
    expected = [None if p.grad is None else p.grad / 2 for p in model.parameters()]
    (grads0, buckets), (grads1, _) = results[0], results[1]
    assert buckets > 2
    assert sum(g is None for g in expected) == 2  # "never"'s weight and bias
    for got0, got1, want in zip(grads0, grads1, expected):
        if want is None:
            assert got0 is None and got1 is None
            continue
        torch.testing.assert_close(got0, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got0, got1)
    assert "accumulating" in results["error0"] and "accumulating" in results["error1"]
    assert results["groups0"] == [[0, 1], [2, 3]] and results["groups1"] == [[0], [1, 2, 3]]


def _same_weights(a_dir, b_dir, name="model.safetensors"):
    a, b = load_file(str(a_dir / "final" / name)), load_file(str(b_dir / "final" / name))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@needs_hh
def test_token_budget_micro_batches_train_the_same_model(tmp_path, monkeypatch):
    """Accumulating over token-balanced micro-batches gives the whole batch's gradient: same weights."""
    import dvpo.stages.sft as sft

    splits = []

    def spy(n, size=0, **kw):
        groups = micro_batches(n, size, **kw)
        splits.append(len(groups))
        return groups

    monkeypatch.setattr(sft, "micro_batches", spy)
    kw = {**TINY, "data.train": str(HH), "data.limit": "32", "train.batch_size": "8", "train.lr": "3e-3",
          "data.eval_fraction": "0", "train.max_steps": "2"}
    run_stage("sft", "sft_tiny", tmp_path / "whole", **kw)
    run_stage("sft", "sft_tiny", tmp_path / "budget", **kw, **{"train.micro_batch_tokens": "200"})
    assert splits[:2] == [1, 1] and min(splits[2:]) > 1
    _same_weights(tmp_path / "whole", tmp_path / "budget")


@needs_hh
def test_token_budget_leaves_dvpo_and_gvm_training_unchanged(sft_model, gvm_model, tmp_path, monkeypatch):
    """A token budget splits the scoring forwards (log-probs, GVM values, the GVM's own targets) and the
    actor's and GVM's micro-batches differently; the trained weights stay those of whole batches."""
    import dvpo.trainer.batches as batches
    from test_dvpo import dvpo_overrides

    splits = []
    real = batches.micro_batches

    def counting(n, size=0, **kw):
        groups = real(n, size, **kw)
        splits.append(len(groups))
        return groups

    for module in ("dvpo.rl.experience", "dvpo.rl.actor", "dvpo.stages.gvm"):
        monkeypatch.setattr(f"{module}.micro_batches", counting)
    kw = dvpo_overrides(sft_model, gvm_model, **{"train.max_steps": "2", "data.eval_size": "0"})
    run_stage("dvpo", "dvpo_tiny", tmp_path / "dvpo_rows", **kw)
    assert max(splits) == 1
    splits.clear()
    run_stage("dvpo", "dvpo_tiny", tmp_path / "dvpo_tokens", **kw, **{"train.micro_batch_tokens": "40"})
    assert max(splits) > 1
    _same_weights(tmp_path / "dvpo_rows", tmp_path / "dvpo_tokens")

    gvm = {**TINY, "model.path": str(sft_model), "data.pairs": str(HH), "data.limit": "24", "data.eval_fraction": "0",
           "train.batch_size": "4", "train.max_steps": "2"}
    splits.clear()
    run_stage("gvm", "gvm_tiny", tmp_path / "gvm_rows", **gvm)
    run_stage("gvm", "gvm_tiny", tmp_path / "gvm_tokens", **gvm, **{"train.micro_batch_tokens": "150"})
    assert max(splits) > 1
    _same_weights(tmp_path / "gvm_rows", tmp_path / "gvm_tokens")
