"""benchmarks/gpu_suite.py: the CPU rehearsal of every step, its summary and tarballs, the --collect round
trip, and that a failed or overrunning step is recorded while the steps after it still run."""
import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
CUDA_STEPS = {"pytest_gpu", "memcheck", "racecheck"}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gs = _load("gpu_suite", SUITE)
report = _load("_report", REPO / "benchmarks" / "_report.py")
# CI runs `python -m dvpo_kernels` itself and tests/test_compile_report.py runs the compile report:
# the rehearsal here runs every other step, which keeps it near two minutes on two cores.
REHEARSED = [name for name in gs.STEP_NAMES if name not in ("selfcheck", "compile_report")]


def run_cli(*args):
    return subprocess.run([sys.executable, str(SUITE), *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)


def members(tarball: Path) -> set[str]:
    with tarfile.open(tarball) as tar:
        return {m.name for m in tar.getmembers()}


def read_member(tarball: Path, name: str) -> str:
    with tarfile.open(tarball) as tar:
        return tar.extractfile(name).read().decode()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One `gpu_suite.py --cpu` run of the rehearsed steps, with no wheels to carry."""
    out, no_wheels = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("wheels")
    proc = run_cli("--cpu", "--only", ",".join(REHEARSED), "--out", out, "--wheels", no_wheels)
    return proc, out, json.loads((out / "summary.json").read_text())


def test_cpu_rehearsal_runs_every_step(rehearsal):
    proc, out, summary = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # what comes back from the GPU machine: at most 8 files, here 4
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "results.tar.gz", "summary.json", "summary.md"]
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == REHEARSED
    for name, s in steps.items():
        # steps that need CUDA only check their command line and tools: a skip, not a pass
        assert s["status"] == ("skipped: no CUDA" if name in CUDA_STEPS else "passed"), name
        assert 0 < s["seconds"] <= s["cap_s"]
    assert steps["pytest_gpu"]["collected"] > 0
    assert sum(s.cap_s for s in gs.STEPS) <= gs.BUDGET_S - gs.RESERVE_S

    env = summary["environment"]
    assert env["device"] == "cpu" and summary["slug"] == "cpu-rehearsal" and summary["cpu"] is True
    assert env["torch"] == torch.__version__
    sha = report.git_state()[0]  # HEAD may move while the suite runs: a commit, not necessarily this one
    assert env["git_sha"] == sha if sha == "unknown" else re.fullmatch("[0-9a-f]{40}", env["git_sha"])
    assert all(env[k] for k in ("python", "triton", "transformers"))
    md = (out / "summary.md").read_text()
    assert "CPU rehearsal" in md and all(f"| {name} |" in md for name in REHEARSED)


def test_cpu_rehearsal_compares_every_benchmark_with_its_target(rehearsal):
    _, _, summary = rehearsal
    found = summary["targets"]
    assert not [t for t in found if t.get("error")]
    for prefix in ("fused_policy_loss speed x floor", "fused_policy_loss lean extra GiB", "linear_logprobs no grad",
                   "gae us", "dvpo_advantages x reading", "rollout tokens/s", "e2e step DVPO fused / PPO-RLHF unfused"):
        assert any(t["what"].startswith(prefix) for t in found), prefix
    for t in found:
        if "GiB" in t["what"] or t["what"].endswith("memory"):
            assert t["measured"] is None and t["met"] is None  # no CUDA memory statistics on the CPU
        else:
            assert isinstance(t["measured"], float) and isinstance(t["met"], bool), t
    # both fused shapes of bench_policy_loss: the tiny CPU shapes stand in for Qwen and Llama-3-8B
    assert {t["what"].split(",")[1].split()[0] for t in found if t["what"].startswith("fused_policy_loss speed x")} \
        == {"Qwen-like", "Llama-3-8B-like"}


def test_cpu_rehearsal_tarballs(rehearsal):
    _, out, _ = rehearsal
    results = members(out / "results.tar.gz")
    for name in ("policy_loss_cpu-tiny", "advantages_cpu", "generation_cpu-tiny", "rlhf_step_cpu"):
        assert {f"{name}.json", f"{name}.md"} <= results, name
    assert "pytest_gpu.xml" in results
    logs = out / "logs.tar.gz"
    assert members(logs) == {f"{name}.log" for name in REHEARSED}
    memcheck = read_member(logs, "memcheck.log")
    assert "compute-sanitizer --tool memcheck" in memcheck and "all cases ok" in memcheck
    assert "triton fused_policy_loss[lean]" in memcheck  # the Triton cases ran through the interpreter
    assert "-m gpu" in read_member(logs, "pytest_gpu.log") and "--dry-run" in read_member(logs, "install.log")


def test_collect_round_trip(rehearsal, tmp_path):
    _, out, summary = rehearsal
    proc = run_cli("--collect", out, "--into", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "gpu_suite_cpu-rehearsal.json").read_text()) == summary
    assert (tmp_path / "gpu_suite_cpu-rehearsal.md").read_text() == (out / "summary.md").read_text()
    for name in members(out / "results.tar.gz"):
        with tarfile.open(out / "results.tar.gz") as tar:
            assert (tmp_path / name).read_bytes() == tar.extractfile(name).read()
    logs = tmp_path / "gpu_suite_logs_cpu-rehearsal"
    assert sorted(p.name for p in logs.iterdir()) == sorted(f"{name}.log" for name in REHEARSED)
    assert run_cli("--collect", tmp_path / "nothing-here").returncode == 2


def test_failed_step_is_recorded_and_later_steps_still_run(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    out = tmp_path / "out"
    proc = run_cli("--cpu", "--only", "racecheck,install", "--out", out, "--wheels", wheels)
    assert proc.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert list(status) == ["install", "racecheck"]  # the suite's order, whatever --only's
    assert status["install"].startswith("failed (exit ") and status["racecheck"] == "skipped: no CUDA"
    install = read_member(out / "logs.tar.gz", "install.log")
    assert "broken-1.0-py3-none-any.whl" in install.split("\n", 1)[1]  # pip's error, past the command line
    assert "pip install --no-index" not in install.split("broken-1.0", 1)[1]  # stopped at the first failure
    assert "all cases ok" in read_member(out / "logs.tar.gz", "racecheck.log")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_step_past_its_cap_is_stopped_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(120)")
    step = gs.Step("sleeper", 1, "sleeps past its cap", lambda r: [gs.Cmd([sys.executable, "-c", code])])
    run = gs.Run(cpu=True, work=tmp_path / "work", wheels=[])
    start = time.monotonic()
    rec = gs.run_step(step, run, cap_s=3)
    assert time.monotonic() - start < 20
    assert rec["status"] == "timed out after 3 s" and gs.failed(rec)
    assert "started" in (run.logs / "sleeper.log").read_text()
    # the grandchild went with its process group; a killed process takes a moment to leave
    grandchild, gone_by = int(pidfile.read_text()), time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < gone_by:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert gs.run_step(step, run, deadline=time.monotonic())["status"] == "skipped: out of time"


def test_unknown_step_is_rejected():
    proc = run_cli("--cpu", "--only", "install,warp_drive")
    assert proc.returncode == 2 and "warp_drive" in proc.stderr


def test_git_state_travels_to_a_copy_without_history(tmp_path, monkeypatch):
    folder = tmp_path / "carry"
    gs.prepare(folder, wheels=())
    recorded = json.loads((folder / "git.json").read_text())
    assert (recorded["sha"], recorded["dirty"]) == report.git_state()
    env = gs.Run(cpu=True, work=tmp_path, wheels=[], git={"sha": "f00d", "dirty": True}).env()
    assert env["DVPO_GIT_SHA"] == "f00d" and env["DVPO_GIT_DIRTY"] == "1"
    # benchmarks/_report.py, run where git cannot tell (no .git), reports what was recorded
    monkeypatch.setattr(report, "REPO", tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv("DVPO_GIT_SHA", "f00d")
    monkeypatch.setenv("DVPO_GIT_DIRTY", "1")
    assert report.git_state() == ("f00d", True)
    monkeypatch.delenv("DVPO_GIT_SHA")
    assert report.git_state()[0] == "unknown"
