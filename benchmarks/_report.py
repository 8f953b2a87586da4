"""What every benchmark report records: device, versions, git state."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_state() -> tuple[str, bool]:
    """(HEAD sha, whether the tree has uncommitted changes).

    A copy of the tree without its history (a GPU machine) takes them from DVPO_GIT_SHA and
    DVPO_GIT_DIRTY, recorded where the copy was made (benchmarks/gpu_suite.py --prepare)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("DVPO_GIT_SHA", "unknown"), os.environ.get("DVPO_GIT_DIRTY") == "1"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import transformers

    sha, dirty = git_state()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "transformers": transformers.__version__, "git_sha": sha, "git_dirty": dirty}
