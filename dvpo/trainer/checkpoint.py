"""Checkpoints ``global_step_N/`` written atomically, found again for ``resume: auto``, rotated.

A checkpoint is written into a hidden temporary folder beside its final place, every file is
fsync'ed, and the folder is renamed into place: a ``global_step_N`` folder that exists is complete,
whatever killed the process. Contents: ``model.safetensors`` (the module's full state dict) and
``optimizer.pt`` in one process -- a checkpoint of a plain Hugging Face model also loads with
``from_pretrained`` -- or, under torch.distributed, ``shards/`` (``torch.distributed.checkpoint``:
each rank writes its own shards of model and optimizer, and a resume on any number of ranks reads
them resharded); then ``scheduler.pt``, ``rng.pt``, ``trainer_state.json`` (step, data position, ...),
plus what the stage adds (model config, tokenizer).

With ``async_save`` the model and optimizer state is copied to CPU memory and written by a background
thread while training goes on (``torch.distributed.checkpoint.async_save`` under torch.distributed, over
a gloo group of its own); the folder is renamed into place when every rank has written, as before. One
checkpoint is in flight at a time: the next save and the end of training wait for it, and a write that
failed on any rank raises on every rank there.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_model, save_file, save_model
from torch import nn
from torch.utils._pytree import tree_map

from . import distributed, parallel
from .rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

PREFIX = "global_step_"
STATE_FILE = "trainer_state.json"
SHARDS = "shards"
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


def _replace(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``."""
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one out first
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def _fresh_tmp(final: Path, tmp: Path | None = None) -> Path:
    """An empty hidden folder beside ``final`` to write it in (a unique name unless ``tmp`` is given)."""
    tmp = tmp or final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    if tmp.exists():  # left by a killed run
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


@contextlib.contextmanager
def atomic_directory(final: Path):
    """Yield a temporary folder; on success it replaces ``final`` in one rename (after fsync)."""
    tmp = _fresh_tmp(Path(final))
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, final)
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


def _cpu_copy(tree):
    """``tree`` with every tensor copied to CPU memory (detached from later in-place updates)."""
    return tree_map(lambda x: x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x, tree)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the state dict, one name per shared tensor (tied weights), as ``save_model`` writes."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


class Checkpointer:
    """Saves and restores model, optimizer, scheduler, RNG and trainer state; rank 0 writes all but the
    model and optimizer shards of a distributed run."""

    def __init__(self, output_dir: str | os.PathLike, save_total_limit: int = 0, async_save: bool = False):
        self.output_dir = Path(output_dir)
        self.save_total_limit = save_total_limit
        self.async_save = async_save
        self._writer: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._gloo = None  # the process group of background distributed writes

    def save(self, step: int, *, model: nn.Module, optimizer, scheduler, state: dict,
             write_extra: Callable[[Path], None] | None = None) -> Path:
        self.wait()
        final = self.output_dir / f"{PREFIX}{step}"
        if distributed.is_distributed():
            self._save_sharded(final, model, optimizer, scheduler, state, write_extra)
        elif self.async_save:
            tensors, optim = _model_tensors(model), _cpu_copy(optimizer.state_dict())
            tmp = _fresh_tmp(final)
            try:
                self._write_rest(tmp, step, scheduler, state, write_extra)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

            def write() -> None:
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                torch.save(optim, tmp / "optimizer.pt")
                self._finalize(tmp, final)

            self._start(write, tmp)
        else:
            with atomic_directory(final) as tmp:
                save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                self._write_rest(tmp, step, scheduler, state, write_extra)
            self._rotate()
        return final

    def _save_sharded(self, final: Path, model, optimizer, scheduler, state, write_extra) -> None:
        """Every rank writes its shards of model and optimizer into ``shards/`` (replicated tensors once);
        rank 0 the rest, then renames the folder into place once all ranks are done."""
        tmp = final.parent / f".tmp-{final.name}"
        if distributed.is_main():
            _fresh_tmp(final, tmp)
        distributed.barrier()
        if self.async_save:
            if self._gloo is None:  # a collective: every rank saves at the same steps
                self._gloo = torch.distributed.new_group(backend="gloo")
            written = dcp.async_save(parallel.sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDS),
                                     process_group=self._gloo)
            written = getattr(written, "upload_completion", written)  # AsyncSaveResponse on newer torch
            if distributed.is_main():
                self._write_rest(tmp, int(final.name.removeprefix(PREFIX)), scheduler, state, write_extra)

            def write() -> None:
                written.result()  # on rank 0: after every rank's shards (DCP writes its metadata last)
                if distributed.is_main():
                    self._finalize(tmp, final)

            self._start(write, tmp if distributed.is_main() else None)
            return
        dcp.save(parallel.sharded_state(model, optimizer), checkpoint_id=str(tmp / SHARDS))
        distributed.barrier()
        if distributed.is_main():
            try:
                self._write_rest(tmp, int(final.name.removeprefix(PREFIX)), scheduler, state, write_extra)
                self._finalize(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        distributed.barrier()

    def _finalize(self, tmp: Path, final: Path) -> None:
        _fsync_tree(tmp)
        _replace(tmp, final)
        self._rotate()

    def _start(self, write: Callable[[], None], tmp: Path | None) -> None:
        def run() -> None:
            try:
                write()
            except BaseException as e:  # raised again by wait(), on the training thread
                log.exception("writing a checkpoint in the background failed")
                self._failure = e
                if tmp is not None and tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)

        self._writer = threading.Thread(target=run, name="dvpo-checkpoint", daemon=False)
        self._writer.start()

    def wait(self) -> None:
        """Block until the checkpoint being written in the background is in place; raise its error."""
        if self._writer is None:
            return
        self._writer.join()
        self._writer = None
        failure, self._failure = self._failure, None
        # every rank has a writer at the same steps: agree on the outcome, or the others would wait for
        # rank 0's rename at the next barrier forever
        failed = distributed.max_over_ranks(int(failure is not None))
        if failed:
            raise RuntimeError("writing a checkpoint in the background failed"
                               + ("" if failure is not None else " on another rank")) from failure

    @staticmethod
    def _write_rest(folder: Path, step: int, scheduler, state: dict, write_extra) -> None:
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng_state(), folder / "rng.pt")
        if write_extra is not None:
            write_extra(folder)
        (folder / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))

    def _rotate(self) -> None:
        if self.save_total_limit <= 0:
            return
        for _, path in list_checkpoints(self.output_dir)[:-self.save_total_limit]:
            shutil.rmtree(path)

    @staticmethod
    def load(path: str | os.PathLike, *, model: nn.Module, optimizer, scheduler) -> dict:
        """Restore everything saved at ``path``; returns the trainer state (``step``, ...)."""
        path = Path(path)
        if (path / SHARDS).is_dir():  # written by a distributed run: resharded onto this run's ranks
            state = parallel.sharded_state(model, optimizer)
            dcp.load(state, checkpoint_id=str(path / SHARDS), no_dist=not distributed.is_distributed())
            parallel.load_sharded_state(model, optimizer, state)
        elif parallel.is_sharded(model) or distributed.is_distributed():
            raise ValueError(f"{path}: a single-process checkpoint; resume it in one process (distributed runs "
                             f"write and read sharded checkpoints, {SHARDS}/)")
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
