"""Checkpoints ``global_step_N/`` written atomically, found again for ``resume: auto``, rotated.

A checkpoint is written into a hidden temporary folder beside its final place, every file is
fsync'ed, and the folder is renamed into place: a ``global_step_N`` folder that exists is complete,
whatever killed the process. Contents: ``model.safetensors`` (the module's full state dict),
``optimizer.pt``, ``scheduler.pt``, ``rng.pt``, ``trainer_state.json`` (step, data position, ...),
plus what the stage adds (model config, tokenizer), so a checkpoint of a plain Hugging Face model
also loads with ``from_pretrained``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from . import distributed, parallel
from .rng import rng_state, set_rng_state

PREFIX = "global_step_"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(rf"^{PREFIX}(\d+)$")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary folder; on success it replaces ``final`` in one rename (after fsync)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): move the old one out first
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Path | None:
    """``train.resume`` -> the checkpoint folder to load, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"train.resume={resume!r} is not a checkpoint folder (no {STATE_FILE})")
    return path


class Checkpointer:
    """Saves and restores model, optimizer, scheduler, RNG and trainer state; only rank 0 writes."""

    def __init__(self, output_dir: str | os.PathLike, save_total_limit: int = 0):
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit

    def save(self, step: int, *, model: nn.Module, optimizer, scheduler, state: dict,
             write_extra: Callable[[Path], None] | None = None) -> Path:
        final = self.output_dir / f"{PREFIX}{step}"
        sharded = parallel.is_sharded(model)
        if sharded:  # gathering is a collective: every rank takes part, rank 0 writes
            model_state = parallel.full_model_state(model)
            optim_state = parallel.full_optimizer_state(model, optimizer)
        if distributed.is_main():
            with atomic_directory(final) as tmp:
                if sharded:
                    save_file(model_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                    torch.save(optim_state, tmp / "optimizer.pt")
                else:
                    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save(rng_state(), tmp / "rng.pt")
                if write_extra is not None:
                    write_extra(tmp)
                (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
            self._rotate()
        distributed.barrier()
        return final

    def _rotate(self) -> None:
        if self.save_total_limit <= 0:
            return
        for _, path in list_checkpoints(self.output_dir)[:-self.save_total_limit]:
            shutil.rmtree(path)

    @staticmethod
    def load(path: str | os.PathLike, *, model: nn.Module, optimizer, scheduler) -> dict:
        """Restore everything saved at ``path``; returns the trainer state (``step``, ...)."""
        path = Path(path)
        if parallel.is_sharded(model):
            parallel.load_full_state(model, optimizer, load_file(str(path / "model.safetensors")),
                                     torch.load(path / "optimizer.pt", weights_only=True))
        else:
            device = next(model.parameters()).device
            missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                             device=str(device))
            if missing or unexpected:
                raise ValueError(f"{path}: checkpoint does not match the model (missing {sorted(missing)[:5]}, "
                                 f"unexpected {sorted(unexpected)[:5]})")
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        # rng.pt holds numpy/python generator states, not only tensors; it is a file this class wrote.
        set_rng_state(torch.load(path / "rng.pt", weights_only=False))
        return json.loads((path / STATE_FILE).read_text())
