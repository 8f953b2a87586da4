"""Registers, spills and shared memory of every GPU kernel, compiled for sm_90 without a GPU.

    python benchmarks/compile_report.py [--subset] [--out DIR] [--no-nvcc]

Triton: each launch variant the ops can produce is compiled with ``triton.compile`` on an
``ASTSource`` for ``GPUTarget("cuda", 90, 32)``, and its PTX goes through Triton's own ptxas with
``-v``. A variant is a kernel with its constexpr switches, its pointer dtypes (bf16 / fp16 / fp32
logits with fp32 statistics, fp64 with fp64) and its tile: the row kernels at BLOCK_V = 4096 with
8 warps and 1024 with 4 warps, the largest per-thread tile of each warp count that
``tiles.row_launch`` picks (smaller tiles hold fewer registers). Switches that shape the vocab loops
(bias, entropy, in-place gradient / saved coefficients / forward only, soft-capping) are crossed
in full; switches that only change a few scalar operations (KL type, KL in the loss, dual clip,
on-policy of the fused kernel) are crossed over the heaviest loop configuration.

CUDA: ``nvcc -cubin -arch=sm_90 -Xptxas -v`` of the csrc/ kernels (skipped, with the reason
printed, when nvcc is missing or --no-nvcc is given).

Writes compile_report.json and compile_report.md to --out (default benchmarks/results/compile)
and exits 1 when any kernel spills or fails to compile. --subset compiles the heaviest variant
of each kernel (what CI runs).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

# The report compiles real kernels: the interpreter's stand-ins cannot be compiled.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ARCH = 90
ROW_TILES = ((4096, 8), (1024, 4))
# Logits dtype -> statistics dtype of the row kernels.
DTYPES = {"bf16": "fp32", "fp16": "fp32", "fp32": "fp32", "fp64": "fp64"}
KL_TYPES = (0, 1, 2, 3, 4, 5)  # none, then _params.KL_TYPE_IDS
HEAVY_KL = dict(KL_TYPE=5, KL_IN_LOSS=True, DUAL=True)
MODES = {"speed": dict(WRITE_GRAD=True, SAVE_COEF=False), "lean": dict(WRITE_GRAD=False, SAVE_COEF=True),
         "forward": dict(WRITE_GRAD=False, SAVE_COEF=False)}


# --- the variants ----------------------------------------------------------------------------

def _variant(module, kernel, consts, ptr_dtypes, num_warps, label, aligned=("stride_z",)):
    return dict(module=module, kernel=kernel, consts=consts, ptr_dtypes=ptr_dtypes, num_warps=num_warps,
                label=label, aligned=list(aligned))


def _row_ptrs(zdt, none=()):
    """Pointer dtypes of a row kernel (None = the pointer is passed as None)."""
    acc = DTYPES[zdt]
    types = dict(z_ptr=zdt, bias_ptr=zdt, tgt_ptr="i64")
    return {"*": acc, **types, **{name: None for name in none}}


def _row_variants(subset):
    mod = "dvpo_kernels.triton_backend.row_kernels"
    dtypes = ("bf16",) if subset else tuple(DTYPES)
    tiles = ROW_TILES[:1] if subset else ROW_TILES
    loops = [(True, True, True)] if subset else list(itertools.product((True, False), repeat=3))
    out = []
    for zdt, (block, warps), (bias, ent, cap) in itertools.product(dtypes, tiles, loops):
        tag = f"{zdt} BLOCK_V={block} bias={int(bias)} ent={int(ent)} softcap={int(cap)}"
        none = (() if bias else ("bias_ptr",))
        common = dict(HAS_BIAS=bias, SOFTCAP=cap, BLOCK_V=block)
        out.append(_variant(mod, "logprob_rows_kernel", dict(common, WANT_ENT=ent),
                            _row_ptrs(zdt, none + (() if ent else ("ent_ptr",))), warps, tag))
        out.append(_variant(mod, "dlogits_rows_kernel", dict(common, HAS_ENT=ent),
                            _row_ptrs(zdt, none + (() if ent else ("ent_ptr", "g_ent_ptr"))), warps, tag))
        for mode in (("speed", "lean") if subset else MODES):
            saved = ("lse_ptr", "g_logp_ptr") + (("ent_ptr", "g_ent_ptr") if ent else ())
            off = none + tuple(p for p in ("lse_ptr", "ent_ptr", "g_logp_ptr", "g_ent_ptr")
                               if mode != "lean" or p not in saved)
            out.append(_variant(mod, "policy_rows_kernel",
                                dict(common, WANT_ENT=ent, ON_POLICY=False, **HEAVY_KL, **MODES[mode]),
                                _row_ptrs(zdt, off), warps, f"{tag} {mode}"))
    if not subset:  # the scalar switches over the heaviest loops (bf16, largest tile, speed mode)
        block, warps = ROW_TILES[0]
        for kl, dual, on_policy in itertools.product(KL_TYPES, (False, True), (False, True)):
            for in_loss in ((False, True) if kl else (False,)):
                consts = dict(HAS_BIAS=True, WANT_ENT=True, SOFTCAP=True, BLOCK_V=block, KL_TYPE=kl,
                              KL_IN_LOSS=in_loss, DUAL=dual, ON_POLICY=on_policy, **MODES["speed"])
                none = ("lse_ptr", "ent_ptr", "g_logp_ptr", "g_ent_ptr") + (() if kl else ("ref_ptr",))
                none += ("old_ptr",) if on_policy else ()
                out.append(_variant(mod, "policy_rows_kernel", consts, _row_ptrs("bf16", none), warps,
                                    f"bf16 BLOCK_V={block} speed kl={kl} kl_in_loss={int(in_loss)} "
                                    f"dual={int(dual)} on_policy={int(on_policy)}"))
    return out


def _token_variants(subset):
    mod = "dvpo_kernels.triton_backend.token_kernels"
    out = []
    combos = [(5, True, True, True)] if subset else [
        (kl, in_loss, dual, ent)
        for kl, dual, ent in itertools.product(KL_TYPES, (False, True), (False, True))
        for in_loss in ((False, True) if kl else (False,))]
    for sd in (("fp32",) if subset else ("fp32", "fp64")):
        for kl, in_loss, dual, ent in combos:
            none = (() if ent else ("ent_ptr", "g_ent_ptr")) + (() if kl else ("ref_ptr",))
            consts = dict(HAS_ENT=ent, KL_TYPE=kl, DUAL=dual, KL_IN_LOSS=in_loss, ENT_IN_LOSS=ent, BLOCK=1024)
            ptrs = {"*": sd, "mask_ptr": "u8", **{name: None for name in none}}
            out.append(_variant(mod, "policy_loss_kernel", consts, ptrs, 4,
                                f"{sd} kl={kl} kl_in_loss={int(in_loss)} dual={int(dual)} ent={int(ent)}",
                                aligned=()))
    return out


# The fallback fp32-accumulating GEMM: dW = dz^T @ h (speed mode, A transposed) and
# dH += dz @ W_slice (lean mode); unit strides arrive as constexpr 1, as the JIT specialises them.
GEMM_LAYOUTS = {"dW": dict(stride_am=1, stride_bn=1, stride_cn=1), "dH": dict(stride_ak=1, stride_bn=1, stride_cn=1)}


def _gemm_variants(subset):
    out = []
    for dt, (layout, ones), acc in itertools.product(("bf16",) if subset else ("bf16", "fp16"),
                                                     GEMM_LAYOUTS.items(), (True, False)):
        consts = dict(ones, ACCUMULATE=acc, UPCAST=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8)
        aligned = [s for s in ("stride_am", "stride_ak", "stride_bk", "stride_cm") if s not in ones]
        out.append(_variant("dvpo_kernels.triton_backend.gemm", "addmm_kernel", consts,
                            {"*": dt, "c_ptr": "fp32"}, 8, f"{dt} {layout} accumulate={int(acc)}", aligned=aligned))
    return out


def triton_variants(subset: bool) -> list[dict]:
    return _row_variants(subset) + _token_variants(subset) + _gemm_variants(subset)


# --- compiling one Triton variant ------------------------------------------------------------

def _ptxas() -> tuple[str, list[str]]:
    """Triton's ptxas for sm_90 and the flags its compiler passes (besides -v and the arch)."""
    from triton.backends.nvidia import compiler

    try:
        path = compiler.get_ptxas(ARCH).path
    except (AttributeError, TypeError):
        path = shutil.which("ptxas")
    extra = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(compiler) else []
    return path, extra


def _signature(fn, v):
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in v["consts"]:
            sig[name] = "constexpr"
            consts[(i,)] = v["consts"][name]
        elif name.endswith("_ptr"):
            dt = v["ptr_dtypes"].get(name, v["ptr_dtypes"]["*"])
            if dt is None:
                sig[name] = "constexpr"
                consts[(i,)] = None
            else:
                sig[name] = "*" + dt
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride") or name in ("width", "n", "col0", "M", "N", "K"):
            sig[name] = "i32"
            if name in v["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = fn.params[i].annotation_type or "fp32"  # hyper-parameters: as annotated
    missing = set(v["consts"]) - set(fn.arg_names)
    if missing:
        raise ValueError(f"{v['kernel']} has no argument(s) {sorted(missing)}")
    return sig, consts, attrs


def _parse_ptxas(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return dict(registers=int(regs.group(1)) if regs else None,
                stack=int(spill.group(1)) if spill else 0,
                spill_stores=int(spill.group(2)) if spill else 0,
                spill_loads=int(spill.group(3)) if spill else 0,
                static_smem=int(smem.group(1)) if smem else 0)


def compile_triton(v: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    row = dict(kind="triton", kernel=v["kernel"], variant=v["label"], num_warps=v["num_warps"])
    try:
        fn = getattr(importlib.import_module(v["module"]), v["kernel"])
        sig, consts, attrs = _signature(fn, v)
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", ARCH, 32),
                                options=dict(num_warps=v["num_warps"]))
        ptxas, extra = _ptxas()
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            run = subprocess.run([ptxas, "-v", *extra, f"--gpu-name=sm_{ARCH}a", str(ptx), "-o", str(ptx) + ".o"],
                                 capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(run.stderr.strip()[-2000:])
        row.update(_parse_ptxas(run.stderr), shared=kernel.metadata.shared)
    except Exception as e:  # one failed variant is reported, the rest still compile
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# --- CUDA sources ----------------------------------------------------------------------------

def _torch_includes(tmp: Path) -> list[str]:
    """torch's headers, plus the one a CPU-only torch lacks (c10/cuda's generated build macros;
    it only marks the library shared, and nothing here links)."""
    import torch.utils.cpp_extension as ext

    dirs = list(ext.include_paths())
    if not any((Path(d) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in dirs):
        shim = tmp / "c10/cuda/impl/cuda_cmake_macros.h"
        shim.parent.mkdir(parents=True)
        shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(tmp))
    return [f"-I{d}" for d in dirs + [sysconfig.get_paths()["include"]]]


def start_nvcc(tmp: Path):
    """Start nvcc on the CUDA sources; returns [(source, Popen)] or the reason it cannot run."""
    from dvpo_kernels import _native_build as nb

    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc")
    if not Path(nvcc).is_file():
        return "nvcc not found (neither on PATH nor in $CUDA_HOME/bin)"
    includes = _torch_includes(tmp)
    procs = []
    for src in nb.sources(True):
        if not src.endswith(".cu"):
            continue
        flags = [f for f in nb.nvcc_flags() if f != "-lineinfo"]
        cmd = [str(nvcc), "-cubin", f"-arch=sm_{ARCH}", "-Xptxas", "-v", "-std=c++20", *flags, *includes,
               f"-I{nb.CSRC}", src, "-o", str(tmp / (Path(src).stem + ".cubin"))]
        procs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    return procs


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def finish_nvcc(procs) -> list[dict]:
    rows = []
    for src, proc in procs:
        log, _ = proc.communicate()
        name = Path(src).name
        if proc.returncode:
            rows.append(dict(kind="cuda", kernel=name, variant="", error=log.strip()[-2000:]))
            continue
        blocks = re.split(r"ptxas info\s*: Compiling entry function ", log)[1:]
        mangled = [re.match(r"'([^']+)'", b).group(1) for b in blocks]
        for pretty, block in zip(_demangle(mangled), blocks):
            # "void dvpo::cuda::(anonymous namespace)::gae_scan_kernel<float, 512>(...)"
            head = re.match(r"(?:void )?([\w:]+)(<.*?>)?\(", pretty.replace("(anonymous namespace)::", ""))
            kernel, targs = (head.group(1).rsplit("::", 1)[-1], head.group(2) or "") if head else (pretty, "")
            rows.append(dict(kind="cuda", kernel=kernel, variant=f"{name} {targs}".strip(),
                             **_parse_ptxas(block)))
    return rows


# --- report ----------------------------------------------------------------------------------

def spills(row: dict) -> bool:
    return bool(row.get("spill_stores") or row.get("spill_loads"))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Kernel compile report (sm_{ARCH})", "",
             f"triton {meta['triton']}, ptxas/nvcc for sm_{ARCH}; {meta['variants']} variants, "
             f"{meta['spilling']} spilling, {meta['failed']} failed. CUDA: {meta['cuda']}", "",
             "| kind | kernel | variant | warps | registers | spill st/ld (B) | stack (B) | smem (B) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['kernel']} | {r['variant']} | | **failed** | | | |")
            continue
        smem = r.get("shared", r.get("static_smem"))
        flag = " **spills**" if spills(r) else ""
        lines.append(f"| {r['kind']} | {r['kernel']} | {r['variant']} | {r.get('num_warps', '')} | "
                     f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']}{flag} | {r['stack']} | {smem} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", action="store_true", help="the heaviest variant of each kernel only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/compile")
    ap.add_argument("--no-nvcc", action="store_true", help="skip the CUDA sources")
    args = ap.parse_args(argv)
    import triton

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        procs = "skipped (--no-nvcc)" if args.no_nvcc else start_nvcc(Path(tmp))
        if isinstance(procs, str):
            print(f"CUDA sources: {procs}")
        variants = triton_variants(args.subset)
        workers = max(1, min(len(variants), os.cpu_count() or 1))
        with cf.ProcessPoolExecutor(workers) as pool:
            rows = list(pool.map(compile_triton, variants))
        cuda = procs if isinstance(procs, str) else f"{len(procs)} source(s) compiled with nvcc"
        if not isinstance(procs, str):
            rows += finish_nvcc(procs)
    bad = [r for r in rows if "error" in r]
    spilling = [r for r in rows if spills(r)]
    meta = dict(arch=f"sm_{ARCH}", triton=triton.__version__, subset=args.subset, variants=len(rows),
                spilling=len(spilling), failed=len(bad), cuda=cuda, seconds=round(time.perf_counter() - t0, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile_report.json").write_text(json.dumps(dict(meta=meta, kernels=rows), indent=1))
    (args.out / "compile_report.md").write_text(markdown(rows, meta))
    width = max(len(f"{r['kernel']} {r['variant']}") for r in rows)
    for r in rows:
        what = (f"FAILED {r['error'].splitlines()[0][:120]}" if "error" in r else
                f"{r['registers']:>3} regs  spill {r['spill_stores']}/{r['spill_loads']} B  "
                f"smem {r.get('shared', r.get('static_smem'))} B" + ("  SPILLS" if spills(r) else ""))
        print(f"{r['kind']:6} {(r['kernel'] + ' ' + r['variant']).ljust(width)}  {what}")
    print(f"{len(rows)} kernels, {len(spilling)} spilling, {len(bad)} failed, {meta['seconds']} s; "
          f"report in {args.out}")
    return 1 if bad or spilling else 0


if __name__ == "__main__":
    sys.exit(main())
