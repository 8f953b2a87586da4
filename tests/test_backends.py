import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import _backends


def test_torch_backend_always_available_and_auto_on_cpu_never_picks_triton():
    assert dk.backend_report(torch.device("cpu"))["torch"] is None
    for op in ("linear_logprobs", "fused_policy_loss", "policy_loss"):
        assert _backends.resolve(op, "auto", torch.device("cpu")) != "triton"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DVPO_KERNELS_BACKEND", "torch")
    assert _backends.resolve("gae", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("DVPO_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DVPO_KERNELS_BACKEND"):
        dk.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delitem(_backends._loaded, "native", raising=False)
    monkeypatch.setitem(_backends._load_errors, "native", "ImportError: extension not built")
    with pytest.raises(RuntimeError, match="extension not built"):
        dk.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), backend="native")


def test_cli_report_and_self_check():
    out = subprocess.run([sys.executable, "-m", "dvpo_kernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for op in ("linear_logprobs", "policy_loss", "fused_policy_loss", "value_head", "gae", "masked_whiten",
               "dvpo_advantages"):
        assert f"{op} " in out.stdout
    assert "all ops ok" in out.stdout and "torch " in out.stdout


def test_torch_compile_fullgraph_from_a_cold_start():
    """A fresh interpreter: nothing imported or resolved before dynamo traces the first op."""
    script = Path(__file__).with_name("_compile_check.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-3000:] + out.stderr[-3000:]


# --- first-use probe of a CUDA device (no GPU needed: the probe is replaced) -----------------

@pytest.fixture
def fake_cuda_probe(monkeypatch):
    """The Triton backend with a probe that records its calls and fails on cuda:1."""
    triton_backend = pytest.importorskip("dvpo_kernels.triton_backend")
    calls = []

    def probe(device):
        calls.append(device)
        return "compute capability 7.0 is below 8.0" if device.index == 1 else None

    monkeypatch.setattr(triton_backend, "probe", probe)
    monkeypatch.setattr(_backends, "_probed", {})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # auto would never pick the interpreter
    return calls


def test_auto_probes_each_cuda_device_once_and_falls_back_with_one_warning(fake_cuda_probe):
    good, bad = torch.device("cuda", 0), torch.device("cuda", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.resolve("fused_policy_loss", "auto", good) == "triton"
    with pytest.warns(RuntimeWarning, match="cuda:1.*compute capability 7.0") as caught:
        for op in ("linear_logprobs", "fused_policy_loss", "policy_loss", "linear_logprobs"):
            assert _backends.resolve(op, "auto", bad) == "torch"
    assert len(caught) == 1
    assert fake_cuda_probe == [good, bad]
    assert "compute capability 7.0" in _backends.report(bad)["triton"]
    assert _backends.report(good)["triton"] is None


def test_forced_triton_on_a_device_that_fails_the_probe_raises_the_reason(fake_cuda_probe):
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="compute capability 7.0"):
        _backends.resolve("linear_logprobs", "triton", torch.device("cuda", 1))


def test_the_real_probe_reports_an_old_gpu_and_a_broken_kernel(monkeypatch):
    probe = pytest.importorskip("dvpo_kernels.triton_backend.probe")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (7, 5))
    assert "compute capability 7.5 is below 8.0" in probe.probe(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))

    def no_gpu(*args, **kwargs):
        raise RuntimeError("ptxas fatal: unknown architecture")

    monkeypatch.setattr(torch, "arange", no_gpu)
    assert "ptxas fatal" in probe.probe(torch.device("cuda", 0))


# --- cuBLAS mixed-precision GEMMs: mm and addmm probed separately -----------------------------

def test_gemm_probes_mm_and_addmm_separately(monkeypatch):
    gemm = pytest.importorskip("dvpo_kernels.triton_backend.gemm")

    def cublas_with_mm_only(acc, a, b, accumulate):  # a build whose addmm lacks out_dtype
        if accumulate:
            raise TypeError("addmm() got an unexpected keyword argument 'out_dtype'")
        acc.copy_(a.float() @ b.float())

    monkeypatch.setattr(gemm, "_cublas_mixed", cublas_with_mm_only)
    cpu = torch.device("cpu")
    assert gemm._probe("mm", cpu, torch.bfloat16) is True
    assert gemm._probe("addmm", cpu, torch.bfloat16) is False


@pytest.mark.parametrize("accumulate,route", [(False, "cublas"), (True, "triton")])
def test_accumulate_mm_routes_each_kind_by_its_own_probe(monkeypatch, accumulate, route):
    gemm = pytest.importorskip("dvpo_kernels.triton_backend.gemm")
    cpu = torch.device("cpu")
    monkeypatch.setattr(gemm, "_CUBLAS_MIXED", {("mm", cpu, torch.bfloat16): True,
                                                ("addmm", cpu, torch.bfloat16): False})
    used = []
    monkeypatch.setattr(gemm, "_cublas_mixed", lambda *a: used.append("cublas"))
    monkeypatch.setattr(gemm, "_triton_addmm", lambda *a: used.append("triton"))
    a, b = torch.ones(3, 4, dtype=torch.bfloat16), torch.ones(4, 5, dtype=torch.bfloat16)
    gemm.accumulate_mm(torch.zeros(3, 5), a, b, accumulate)
    assert used == [route]


def test_auto_never_picks_the_triton_interpreter_even_for_cuda_tensors(fake_cuda_probe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends.resolve("fused_policy_loss", "auto", torch.device("cuda", 0)) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backends.resolve("fused_policy_loss", "auto", torch.device("cuda", 0)) == "triton"


def test_test_session_runs_the_interpreter_unless_gpu_triton_tests_are_selected():
    from conftest import _selects

    triton_gpu = {"gpu", "triton"}
    assert not _selects("not gpu", triton_gpu)  # plain `pytest`: interpreter on, even with CUDA
    assert _selects("gpu", triton_gpu)  # `pytest -m gpu`: compiled kernels
    assert _selects("", triton_gpu) and _selects("gpu or not gpu", triton_gpu)
