"""benchmarks/compile_report.py on its --subset: every Triton kernel and (where nvcc exists) every
CUDA kernel compiles for sm_90 without a GPU, and none spills registers."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRITON_KERNELS = {"logprob_rows_kernel", "dlogits_rows_kernel", "policy_rows_kernel", "policy_loss_kernel",
                  "addmm_kernel"}
CUDA_KERNELS = {"project_kernel", "finalize_kernel", "gae_scan_kernel", "whiten_kernel", "moments_kernel"}


@pytest.mark.slow
def test_subset_compiles_for_sm90_without_spills(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "benchmarks/compile_report.py", "--subset", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "compile_report.json").read_text())
    rows = report["kernels"]
    assert not [r for r in rows if "error" in r]
    assert {r["kernel"] for r in rows if r["kind"] == "triton"} == TRITON_KERNELS
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0
    row_kernels = [r for r in rows if r["kernel"] == "policy_rows_kernel"]
    assert {"speed", "lean"} <= {r["variant"].split()[-1] for r in row_kernels}
    if shutil.which("nvcc"):
        assert CUDA_KERNELS <= {r["kernel"] for r in rows if r["kind"] == "cuda"}
    else:
        assert "nvcc not found" in run.stdout
    md = (tmp_path / "compile_report.md").read_text()
    assert "| registers |" in md and md.count("\n| triton |") == sum(r["kind"] == "triton" for r in rows)
