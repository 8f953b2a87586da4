"""What every benchmark report records: device, versions, git state."""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_state() -> tuple[str, bool]:
    """(HEAD sha, whether the tree has uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                                    text=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


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
