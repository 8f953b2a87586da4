"""One command that installs, validates and benchmarks everything on a GPU machine, in at most 8 minutes.

    python benchmarks/gpu_suite.py --prepare         # here: the wheels to carry and the git SHA, into .gpu_suite/
    python benchmarks/gpu_suite.py                   # on the GPU machine: 4 files into --out ($OUT there)
    python benchmarks/gpu_suite.py --collect DIR     # here: unpack what came back into benchmarks/results/
    python benchmarks/gpu_suite.py --cpu             # rehearsal: every step at tiny size on the CPU

Steps run in order, each a subprocess with its own time cap and log; a failed step does not stop the
ones after it. ``--only STEP,...`` runs a subset (a rerun after a fix). Out of ``--out`` come four
files: ``summary.json`` and ``summary.md`` (device, versions, git SHA, each step's status, time and
cap, and the key numbers against issue 17's targets), ``results.tar.gz`` (every JSON/Markdown
result) and ``logs.tar.gz`` (one log per step). With ``--cpu``, steps that need CUDA (pytest -m gpu,
compute-sanitizer) run a dry run instead -- the sanitizer's driver on CPU tensors, pytest's
collection -- and report "skipped: no CUDA". benchmarks/README_gpu_suite.md has the device call and
the reasoning behind each cap. Exit status 1 when a step failed or ran out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".gpu_suite"  # wheels/ and git.json, made by --prepare, carried to the GPU machine
CARRIED_WHEELS = ("liger-kernel==0.8.5",)  # pure Python; torch and triton are on the image
# The GPU machine's image: Python 3.12 on x86-64 (manylinux tags pip must match exactly).
WHEEL_TARGET = ["--python-version", "3.12", "--implementation", "cp"] + [
    arg for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
    for arg in ("--platform", tag)]
BUDGET_S = 480  # one 10-minute call runs everything; a rerun of the failed steps fits in 15 minutes of device time
RESERVE_S = 20  # the environment probe and the packing, outside any step
CPU_CAP_S = 900  # --cpu: a rehearsal checks the script; its time says nothing about the GPU budget
SANITIZER_DRIVER = "benchmarks/sanitizer_cases.py"


@dataclass(frozen=True)
class Cmd:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Run:
    """What the steps of one run share: CPU rehearsal or GPU, the scratch folder, carried wheels."""
    cpu: bool
    work: Path
    wheels: list[Path]
    git: dict | None = None  # {"sha", "dirty"} made by --prepare, for a copy of the tree without .git
    py: str = sys.executable

    @property
    def results(self) -> Path:
        return self.work / "results"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def site(self) -> Path:
        return self.work / "site"

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")  # the GPU machine has no network
        # the checkout first: every step imports this tree even if the editable install failed
        paths = ([str(self.site)] if self.wheels else []) + [str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        if self.cpu:  # CPU tensors everywhere, Triton kernels through its interpreter, on any machine
            env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        if self.git and "DVPO_GIT_SHA" not in env:  # read by benchmarks/_report.py when git cannot tell
            env.update(DVPO_GIT_SHA=self.git["sha"], DVPO_GIT_DIRTY="1" if self.git["dirty"] else "0")
        return env


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: int  # seconds on an H200; README_gpu_suite.md says why
    about: str
    commands: Callable[[Run], list[Cmd]]  # the GPU commands, or the tiny ones under --cpu
    dry_run: Callable[[Run], list[Cmd]] | None = None  # needs CUDA: --cpu runs this and reports a skip


# --- the steps -------------------------------------------------------------------------------

def _bench(script: str, gpu: list[str], cpu: list[str]) -> Callable[[Run], list[Cmd]]:
    return lambda r: [Cmd([r.py, f"benchmarks/{script}", *(cpu if r.cpu else gpu), "--out", str(r.results)])]


def _install(r: Run) -> list[Cmd]:
    cmds = []
    if r.wheels:
        cmds.append(Cmd([r.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                         "--no-cache-dir", "--upgrade", "--target", str(r.site), *map(str, r.wheels)]))
    pip = [r.py, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps"]
    if r.cpu:  # resolves and builds the metadata; compiles nothing and touches no environment
        cmds.append(Cmd(pip + ["--dry-run", "-e", "."]))
    else:  # -v: setup.py says why it fell back to a CPU-only extension, if it did
        cmds.append(Cmd(pip + ["-v", "-e", "."], {"TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": str(os.cpu_count())}))
    check = ("import sys; from dvpo_kernels import native_backend as n; why = n.unsupported(sys.argv[1]); "
             "print('native backend on', sys.argv[1] + ':', why or 'ready'); sys.exit(1 if why else 0)")
    cmds.append(Cmd([r.py, "-c", check, "cpu" if r.cpu else "cuda"]))
    return cmds


def _pytest_gpu(r: Run, collect_only: bool = False) -> list[Cmd]:
    argv = [r.py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
            "--junitxml", str(r.results / "pytest_gpu.xml")]
    return [Cmd(argv + (["--collect-only"] if collect_only else []))]


def sanitizer_path() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin/compute-sanitizer").is_file():
            return str(Path(home) / "bin/compute-sanitizer")
    return None


def _sanitizer(tool: str) -> Callable[[Run], list[Cmd]]:
    # one allocation per tensor: an out-of-bounds read lands outside any allocation, where memcheck sees it
    return lambda r: [Cmd([sanitizer_path() or "compute-sanitizer", "--tool", tool, "--error-exitcode", "99",
                           "--print-limit", "30", r.py, SANITIZER_DRIVER], {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})]


STEPS = (
    Step("install", 70, "wheels carried, pip install --no-build-isolation -e . (sm_90), native backend ready",
         _install),
    Step("selfcheck", 15, "python -m dvpo_kernels: every op on every backend against float64",
         lambda r: [Cmd([r.py, "-m", "dvpo_kernels"])]),
    Step("pytest_gpu", 70, "python -m pytest -m gpu", _pytest_gpu, lambda r: _pytest_gpu(r, collect_only=True)),
    Step("memcheck", 30, "compute-sanitizer memcheck on small native and Triton cases", _sanitizer("memcheck"),
         lambda r: [Cmd([r.py, SANITIZER_DRIVER, "--cpu"])]),
    # the dry run of memcheck already ran the Triton cases through the interpreter
    Step("racecheck", 25, "compute-sanitizer racecheck on the same cases", _sanitizer("racecheck"),
         lambda r: [Cmd([r.py, SANITIZER_DRIVER, "--cpu", "--backends", "native"])]),
    Step("bench_policy_loss", 80, "fused loss, both shapes: floor / eager / compile / Liger / ours speed and lean",
         _bench("bench_policy_loss.py", ["--no-sweep", "--reps", "5"], ["--cpu", "--no-sweep", "--reps", "1"])),
    Step("bench_advantages", 30, "gae and dvpo_advantages against the loop and the byte floor",
         _bench("bench_advantages.py", ["--budget", "0.25"], ["--cpu", "--budget", "0.01", "--hidden", "16"])),
    Step("bench_generation", 35, "rollout engines against transformers generate, 0.5B, 32 x 256 tokens",
         _bench("bench_generation.py", ["--repeats", "2"],
                ["--cpu", "--batch", "2", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1"])),
    Step("bench_rlhf_step", 75, "one RLHF step, PPO-RLHF and DVPO, unfused and fused, 0.5B",
         _bench("e2e/bench_rlhf_step.py", ["--warmup", "1", "--steps", "2"],
                ["--tiny", "--cpu", "--batch", "4", "--warmup", "0", "--steps", "1"])),
    Step("bench_packing", 15, "packed vs padded value-model steps on the HH length distribution, 0.5B shape",
         _bench("bench_packing.py", ["--device", "cuda", "--hidden", "896", "--layers", "24", "--steps", "4"],
                ["--hidden", "32", "--layers", "1", "--steps", "1", "--max-length", "256"])),
    # The heaviest variant of each Triton kernel, compiled by the image's Triton (CI compiles every variant
    # with its own Triton, and nvcc's report of csrc/ is the same wherever nvcc 13 runs).
    Step("compile_report", 15, "registers and spills of the heaviest Triton variants, the image's Triton",
         _bench("compile_report.py", ["--subset", "--no-nvcc"], ["--subset", "--no-nvcc"])),
)
STEP_NAMES = tuple(s.name for s in STEPS)


# --- running a step ----------------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """End the step's process group (compile workers too): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def run_command(cmd: Cmd, r: Run, log, timeout_s: float) -> int | None:
    """Exit status, or None when the command ran past ``timeout_s`` and was stopped."""
    log.write(f"$ {shlex.join(cmd.argv)}\n")
    log.flush()
    try:
        proc = subprocess.Popen(cmd.argv, cwd=REPO, env={**r.env(), **cmd.env}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        log.write(f"cannot start {cmd.argv[0]}: {e}\n")
        return 127
    try:
        return proc.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        _stop(proc)
        return None


def _children_cpu_s() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run_step(step: Step, r: Run, deadline: float | None = None, cap_s: float | None = None) -> dict:
    """Run one step's commands in order into its log; stop at the first that fails."""
    cap = cap_s if cap_s is not None else (CPU_CAP_S if r.cpu else step.cap_s)
    if deadline is not None:
        cap = min(cap, deadline - time.monotonic())
    rec = dict(name=step.name, about=step.about, cap_s=round(cap), seconds=0.0, log=f"{step.name}.log")
    if cap < 1:
        rec["status"] = "skipped: out of time"
        return rec
    dry = r.cpu and step.dry_run is not None
    r.logs.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.monotonic(), _children_cpu_s()
    rc: int | None = 0
    with open(r.logs / rec["log"], "w") as log:
        if dry:
            log.write("dry run (no CUDA). On the GPU this step runs:\n")
            for cmd in step.commands(r):
                env = " ".join(f"{k}={v}" for k, v in cmd.env.items())
                log.write(f"  {env + ' ' if env else ''}{shlex.join(cmd.argv)}\n")
                if not Path(cmd.argv[0]).is_file() and not shutil.which(cmd.argv[0]):
                    log.write(f"  ({cmd.argv[0]} is not on this machine; the GPU image has it)\n")
        for cmd in (step.dry_run if dry else step.commands)(r):
            rc = run_command(cmd, r, log, start + cap - time.monotonic())
            if rc != 0:
                break
    rec["seconds"] = round(time.monotonic() - start, 1)
    rec["cpu_s"] = round(_children_cpu_s() - cpu_start, 1)  # on a shared machine, steadier than the wall clock
    if rc is None:
        rec["status"] = f"timed out after {cap:.0f} s"
    elif rc != 0:
        rec["status"] = f"failed: dry run (exit {rc})" if dry else f"failed (exit {rc})"
    else:
        rec["status"] = "skipped: no CUDA" if dry else "passed"
    rec.update(details(step.name, r))
    return rec


def failed(rec: dict) -> bool:
    return rec["status"].startswith(("failed", "timed out"))


# --- what each step measured ------------------------------------------------------------------

def details(name: str, r: Run) -> dict:
    """The step's own counts, read from its outputs (empty when it wrote none)."""
    if name == "pytest_gpu":
        out = {}
        log = (r.logs / "pytest_gpu.log").read_text(errors="replace")
        collected = re.findall(r"(\d+)(?:/\d+)? tests? collected", log)
        if collected:  # --collect-only (the dry run) says how many; a run's counts come from its report
            out["collected"] = int(collected[-1])
        if (r.results / "pytest_gpu.xml").is_file() and not collected:
            suite = ET.parse(r.results / "pytest_gpu.xml").getroot()
            suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
            out["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        return out
    if name in ("memcheck", "racecheck"):
        text = (r.logs / f"{name}.log").read_text(errors="replace")
        found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        return {"sanitizer_errors": int(found[-1])} if found else {}
    if name == "compile_report" and (r.results / "compile_report.json").is_file():
        meta = json.loads((r.results / "compile_report.json").read_text())["meta"]
        return {"kernels": {k: meta.get(k) for k in ("variants", "spilling", "failed", "triton")}}
    return {}


def _one(results: Path, pattern: str) -> dict | None:
    found = sorted(results.glob(pattern))
    return json.loads(found[0].read_text()) if found else None


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def _target(what, measured, op, limit, context="") -> dict:
    met = None if measured is None else (measured <= limit if op == "<=" else measured >= limit)
    return dict(what=what, measured=measured, target=f"{op} {limit:g}", met=met, context=context)


def _policy_loss(data: dict) -> list[dict]:
    out = []
    # the two fixed shapes come first, sweeps after; the CPU rehearsal's tiny shapes stand in for them
    for res, (shape, gib) in zip(data["results"], (("Qwen", 1.22), ("Llama-3-8B", 2.31))):
        rows = {r["provider"]: r for r in res["rows"]}
        where = f"{shape}-like {res['label']} N={res['n']} H={res['h']} V={res['v']}"
        # the same run's anchors: every provider that is not ours (eager, compile, Liger, TRL, verl)
        ctx = "; ".join(f"{p} x{_fmt(r['x_floor'], '.2f')}"
                        + ("" if r["extra_gib"] is None else f" {r['extra_gib']:.2f} GiB")
                        for p, r in rows.items() if p != "floor" and not p.startswith("dvpo") and r["ms"] is not None)
        ctx = f"floor {_fmt(rows.get('floor', {}).get('ms'), '.2f')} ms; {ctx}"
        for mode, x_max, gib_max in (("speed", 1.15, gib), ("lean", 1.4, 0.4)):
            row = rows.get(f"dvpo-triton-{mode}", {})
            out.append(_target(f"fused_policy_loss {mode} x floor, {where}", row.get("x_floor"), "<=", x_max, ctx))
            out.append(_target(f"fused_policy_loss {mode} extra GiB, {where}", row.get("extra_gib"), "<=", gib_max))
        fwd = {r["provider"]: r for r in res.get("forward") or []}
        if fwd:
            ctx = "; ".join(f"{p} x{_fmt(r['x_gemm'], '.2f')}" for p, r in fwd.items()
                            if p not in ("gemm", "dvpo-triton") and r["ms"] is not None)
            out.append(_target(f"linear_logprobs no grad x one GEMM, {where}", fwd.get("dvpo-triton", {}).get("x_gemm"),
                               "<=", 1.15, f"GEMM {_fmt(fwd.get('gemm', {}).get('ms'), '.2f')} ms; {ctx}"))
    return out


def _advantages(data: dict) -> list[dict]:
    out = []
    for i, row in enumerate(data["results"]):
        where = f"B x T = {row['B']} x {row['T']}"
        for kind in ("scan", "full"):
            us = row["us"][kind]
            calls = {k: v for k, v in us.items() if k != "loop" and not k.endswith(":graph")}
            best = min(calls, key=calls.get)
            graphs = [v for k, v in us.items() if k.endswith(":graph")]
            ctx = (f"best call {best}; CUDA-graph replay {_fmt(min(graphs) if graphs else None)} us; "
                   f"loop {_fmt(us['loop'])} us")
            if kind == "scan" and i < 2:  # issue 17's gae targets: 64 x 2048 and 256 x 4096
                out.append(_target(f"gae us, {where}", calls[best], "<=", (50, 100)[i], ctx))
            elif kind == "full":
                out.append(_target(f"dvpo_advantages x reading gvm_hidden once, {where}",
                                   calls[best] / row["floor_us"]["full"], "<=", 1.5, ctx))
    return out


def _generation(data: dict) -> list[dict]:
    ours = [r for r in data["results"] if r["engine"] != "hf"]
    best = max(ours, key=lambda r: r["speedup_vs_hf"])
    hf = next(r for r in data["results"] if r["engine"] == "hf")
    return [_target("rollout tokens/s x transformers generate", best["speedup_vs_hf"], ">=", 5.0,
                    f"{best['engine']} {best['ms_per_decode_step']:.2f} ms/step; generate "
                    f"{hf['ms_per_decode_step']:.2f} ms/step")]


def _rlhf_step(data: dict) -> list[dict]:
    out = []
    limits = {"ppo_unfused": (("memory", 0.5), ("without_gen", 0.5), ("step", 0.57)),
              "ppo_fused": (("memory", 0.65), ("without_gen", 0.65))}
    for base, checks in limits.items():
        ratio = data["ratios"].get(f"dvpo_fused / {base}")
        if ratio is None:
            continue
        for key, limit in checks:
            out.append(_target(f"e2e step DVPO fused / PPO-RLHF {base.split('_')[1]}, {key.replace('_', ' ')}",
                               ratio[key], "<=", limit))
    return out


TARGET_READERS = (("policy_loss_*.json", _policy_loss), ("advantages_*.json", _advantages),
                  ("generation_*.json", _generation), ("rlhf_step_*.json", _rlhf_step))


def targets(results: Path) -> list[dict]:
    """Issue 17's targets with what this run measured, for the results it has."""
    out = []
    for pattern, read in TARGET_READERS:
        data = _one(results, pattern)
        if data is None:
            continue
        try:
            out += read(data)
        except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, StopIteration) as e:
            out.append(dict(what=pattern, measured=None, target="-", met=None,
                            context=f"unreadable: {type(e).__name__}: {e}", error=True))
    return out


# --- environment, summary, packing ------------------------------------------------------------

def environment() -> dict:
    """Device, versions and git state, as the steps' children see them (run in a child: --environment)."""
    import importlib.metadata as md
    import platform

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _report import git_state

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    def tool(*argv, pick=None):
        """The last word of the last output line (that contains ``pick``): a version, mostly."""
        try:
            lines = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return None
        lines = [line for line in lines if line.strip() and (pick is None or pick in line)]
        return lines[-1].split()[-1] if lines else None

    sha, dirty = git_state()
    env = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               triton=version("triton"), transformers=version("transformers"), liger_kernel=version("liger-kernel"),
               git_sha=sha, git_dirty=dirty, nvcc=tool("nvcc", "--version", pick="release"),
               compute_sanitizer=tool(sanitizer_path() or "compute-sanitizer", "--version", pick="Version"))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   driver=tool("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"))
    else:
        env.update(device="cpu", cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    return env


def probe_environment(r: Run) -> dict:
    proc = subprocess.run([r.py, str(Path(__file__).resolve()), "--environment"], cwd=REPO, env=r.env(),
                          capture_output=True, text=True, timeout=120)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (proc.stdout + proc.stderr).strip()[-2000:]}


def slug(env: dict) -> str:
    name = env.get("device", "unknown")
    return "cpu-rehearsal" if name == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def to_markdown(summary: dict) -> str:
    env = summary["environment"]
    title = ("CPU rehearsal (checks the suite; its numbers are not results)" if summary["cpu"]
             else f"GPU suite on {env.get('device')}")
    sha = str(env.get("git_sha", "unknown"))
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "triton", "transformers",
                                                    "liger_kernel", "driver", "nvcc", "compute_sanitizer")
                         if env.get(k))
    budget = "" if summary["cpu"] else f" of a {summary['budget_s']} s budget"
    lines = [f"# {title}", "", f"git {sha[:12]}{' (dirty)' if env.get('git_dirty') else ''}; {versions}.",
             f"Started {summary['started']}; {summary['wall_s']:.0f} s{budget}.", "",
             "| step | status | s | CPU s | cap s | what |", "|---|---|---:|---:|---:|---|"]
    for s in summary["steps"]:
        extra = {k: v for k, v in s.items() if k in ("collected", "tests", "sanitizer_errors", "kernels")}
        note = f" {json.dumps(extra)}" if extra else ""
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {s.get('cpu_s', 0):.0f} | {s['cap_s']} | "
                     f"{s['about']}{note} |")
    if summary["targets"]:
        lines += ["", "## Issue 17's targets", "", "| what | measured | target | met | context |",
                  "|---|---:|---|---|---|"]
        for t in summary["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            lines.append(f"| {t['what']} | {_fmt(t['measured'])} | {t['target']} | {met} | {t['context']} |")
    return "\n".join(lines) + "\n"


def _tar(path: Path, folder: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(folder.glob("*")) if folder.is_dir() else []:
            if f.is_file():
                tar.add(f, arcname=f.name)


def run_suite(cpu: bool, out: Path, only: list[str], wheels: list[Path], git: dict | None) -> int:
    steps = [s for s in STEPS if s.name in only]
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    try:
        r = Run(cpu=cpu, work=work, wheels=wheels, git=git)
        r.results.mkdir(parents=True)
        started, t0 = time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.monotonic()
        deadline = None if cpu else t0 + BUDGET_S - RESERVE_S
        env, records = None, []
        for step in steps:
            if env is None and step.name != "install":  # after the install: the wheels' versions too
                env = probe_environment(r)
            rec = run_step(step, r, deadline)
            records.append(rec)
            print(f"[{time.monotonic() - t0:6.1f} s] {step.name}: {rec['status']} ({rec['seconds']:.0f} s of "
                  f"{rec['cap_s']} s)", flush=True)
        env = env or probe_environment(r)
        summary = dict(suite="gpu_suite", cpu=cpu, slug=slug(env), started=started,
                       wall_s=round(time.monotonic() - t0, 1), budget_s=BUDGET_S, environment=env,
                       steps=records, targets=targets(r.results))
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out / "summary.md").write_text(to_markdown(summary))
        _tar(out / "results.tar.gz", r.results)
        _tar(out / "logs.tar.gz", r.logs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(to_markdown(summary))
    print(f"wrote summary.json, summary.md, results.tar.gz, logs.tar.gz to {out}")
    return 1 if any(failed(s) for s in records) else 0


# --- before and after the GPU run --------------------------------------------------------------

def collect(src: Path, into: Path) -> list[Path]:
    """Unpack what a run left in ``src`` into ``into``: results flat, summary as gpu_suite_<device>.*,
    logs under gpu_suite_logs_<device>/."""
    summary = json.loads((src / "summary.json").read_text())
    name = summary["slug"]
    into.mkdir(parents=True, exist_ok=True)
    written = []
    for tarball, dest in (("results.tar.gz", into), ("logs.tar.gz", into / f"gpu_suite_logs_{name}")):
        with tarfile.open(src / tarball) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            tar.extractall(dest, members=members, filter="data")
        written += [dest / m.name for m in members]
    for ext in ("json", "md"):
        shutil.copyfile(src / f"summary.{ext}", into / f"gpu_suite_{name}.{ext}")
        written.append(into / f"gpu_suite_{name}.{ext}")
    return written


def prepare(folder: Path = CARRY, wheels=CARRIED_WHEELS) -> None:
    """Here, before the device call: download the wheels the image lacks and record the git state
    (the GPU machine gets the files of the tree, not its history)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _report import git_state

    (folder / "wheels").mkdir(parents=True, exist_ok=True)
    sha, dirty = git_state()
    (folder / "git.json").write_text(json.dumps({"sha": sha, "dirty": dirty}) + "\n")
    for spec in wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        *WHEEL_TARGET, "-d", str(folder / "wheels"), spec], check=True)
    if folder.resolve().parent == REPO:  # keep the carried folder out of git without touching .gitignore
        exclude = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO,
                                      capture_output=True, text=True, check=True).stdout.strip())
        exclude = exclude if exclude.is_absolute() else REPO / exclude
        line = f"/{folder.name}/"
        if line not in (exclude.read_text().splitlines() if exclude.is_file() else []):
            exclude.parent.mkdir(parents=True, exist_ok=True)
            with open(exclude, "a") as f:
                f.write(line + "\n")
    print(f"{folder}: git {sha[:12]}{' (dirty)' if dirty else ''}, wheels: "
          f"{', '.join(p.name for p in sorted((folder / 'wheels').glob('*.whl'))) or 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="rehearse every step at tiny size on the CPU")
    ap.add_argument("--out", type=Path, help="where the 4 files go (default $OUT, else benchmarks/results/gpu_suite)")
    ap.add_argument("--only", help=f"comma-separated steps, from: {','.join(STEP_NAMES)}")
    ap.add_argument("--wheels", type=Path, default=CARRY / "wheels", help="wheels to install first (--target)")
    ap.add_argument("--collect", type=Path, metavar="DIR", help="unpack the files a run left in DIR, then exit")
    ap.add_argument("--into", type=Path, default=REPO / "benchmarks" / "results", help="where --collect unpacks")
    ap.add_argument("--prepare", action="store_true", help=f"download {', '.join(CARRIED_WHEELS)} and record the "
                    f"git state into {CARRY.name}/, then exit")
    ap.add_argument("--environment", action="store_true", help="print this machine's device and versions as JSON")
    args = ap.parse_args(argv)

    if args.environment:
        print(json.dumps(environment()))
        return 0
    if args.prepare:
        prepare()
        return 0
    if args.collect:
        if not (args.collect / "summary.json").is_file():
            ap.error(f"--collect: no summary.json in {args.collect}")
        for path in collect(args.collect, args.into):
            print(f"wrote {path}")
        return 0
    only = list(STEP_NAMES) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STEP_NAMES]
    if unknown or not only:
        ap.error(f"--only: unknown step(s) {unknown}; choose from {','.join(STEP_NAMES)}")
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device; use --cpu to rehearse the suite")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "benchmarks/results/gpu_suite")
    wheels = sorted(args.wheels.glob("*.whl")) if args.wheels.is_dir() else []
    git_file = CARRY / "git.json"
    git = json.loads(git_file.read_text()) if git_file.is_file() else None
    return run_suite(args.cpu, out, only, wheels, git)


if __name__ == "__main__":
    sys.exit(main())
