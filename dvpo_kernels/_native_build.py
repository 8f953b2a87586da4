"""How the native extension is compiled: sources and flags shared by setup.py and the
just-in-time build (``dvpo_kernels.native_backend.build()``).

Imports only the standard library at module level: setup.py loads this file by path before
the package (or even torch) can be imported.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CPU_SOURCES = ("bindings.cpp", "advantages_cpu.cpp")
CUDA_SOURCES = ("advantages_cuda.cu",)
JIT_NAME = "dvpo_kernels_native"
# Architectures built when no GPU is visible at build time and TORCH_CUDA_ARCH_LIST is unset.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _openmp() -> list[str]:
    # at::parallel_for is a header template: without -fopenmp the CPU twins would run serially.
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


# No -std flag: torch.utils.cpp_extension adds the C++ standard its headers need.
def cxx_flags(with_cuda: bool) -> list[str]:
    return ["-O3"] + _openmp() + (["-DDVPO_WITH_CUDA"] if with_cuda else [])


def nvcc_flags() -> list[str]:
    return ["-O3", "-lineinfo", "-DDVPO_WITH_CUDA"]


def ld_flags() -> list[str]:
    return _openmp()


def cuda_support() -> tuple[bool, str]:
    """(whether the CUDA kernels can be compiled here, why not)."""
    if os.environ.get("DVPO_KERNELS_CUDA", "1") == "0":
        return False, "DVPO_KERNELS_CUDA=0"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA support"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return True, ""


def default_cuda_archs() -> None:
    """Pick target architectures when torch cannot detect them (no visible GPU at build time)."""
    import torch

    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS


def sources(with_cuda: bool, root: Path = CSRC) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(root / n) for n in names]


def jit_load(with_cuda: bool, verbose: bool = False):
    """Compile and import the extension with torch.utils.cpp_extension.load (cached by torch)."""
    from torch.utils import cpp_extension

    missing = [s for s in sources(with_cuda) if not Path(s).is_file()]
    if missing:
        raise RuntimeError(f"the C++/CUDA sources are not here ({missing[0]}): a just-in-time build needs a "
                           "source checkout of the repository")
    if with_cuda:
        default_cuda_archs()
    return cpp_extension.load(
        name=JIT_NAME + ("_cuda" if with_cuda else "_cpu"),
        sources=sources(with_cuda),
        extra_cflags=cxx_flags(with_cuda),
        extra_cuda_cflags=nvcc_flags() if with_cuda else None,
        extra_ldflags=ld_flags(),
        extra_include_paths=[str(CSRC)],
        with_cuda=with_cuda,
        verbose=verbose,
    )
