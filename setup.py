"""Builds the optional extension dvpo_kernels._C from csrc/; installs cleanly without it.

Install torch first, then ``pip install -e . --no-build-isolation`` (build isolation would
hide that torch). The C++ CPU kernels are always built; the CUDA kernels too when torch has
CUDA and nvcc is found. Without torch in the build environment, or when no compiler works,
the package installs without the extension: ``python -m dvpo_kernels`` then says why the
native backend is unavailable, and ``dvpo_kernels.native_backend.build()`` can compile it later.

Environment: DVPO_KERNELS_BUILD_EXT=0 skips the extension; DVPO_KERNELS_CUDA=0 builds the
CPU part only; TORCH_CUDA_ARCH_LIST picks GPU architectures (default: the visible GPU, else
8.0;9.0+PTX); MAX_JOBS bounds ninja's parallelism.
"""
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
EXT_NAME = "dvpo_kernels._C"


def _say(msg: str) -> None:
    print(f"dvpo setup: {msg}", file=sys.stderr)


def _native_build():
    spec = importlib.util.spec_from_file_location("_dvpo_native_build", ROOT / "dvpo_kernels" / "_native_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extension_setup() -> dict:
    if os.environ.get("DVPO_KERNELS_BUILD_EXT", "1") == "0":
        _say("DVPO_KERNELS_BUILD_EXT=0: installing without dvpo_kernels._C")
        return {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # no torch in the build environment (build isolation, or not installed yet)
        _say(f"torch is not importable while building ({e}); installing without dvpo_kernels._C. "
             "Install torch first and use `pip install --no-build-isolation` to build the native kernels.")
        return {}

    nb = _native_build()
    # setuptools wants source paths relative to setup.py.
    rel = Path(os.path.relpath(nb.CSRC, ROOT))

    def make(with_cuda: bool):
        kw = dict(sources=nb.sources(with_cuda, rel), include_dirs=[str(rel)], extra_link_args=nb.ld_flags())
        if with_cuda:
            return CUDAExtension(EXT_NAME, extra_compile_args={"cxx": nb.cxx_flags(True), "nvcc": nb.nvcc_flags()},
                                 **kw)
        return CppExtension(EXT_NAME, extra_compile_args={"cxx": nb.cxx_flags(False)}, **kw)

    with_cuda, why = nb.cuda_support()
    if with_cuda:
        nb.default_cuda_archs()
        try:
            ext = make(True)
        except Exception as e:  # e.g. CUDA libraries missing beside nvcc
            with_cuda, why = False, f"{type(e).__name__}: {e}"
    if not with_cuda:
        _say(f"building the C++ CPU kernels only ({why})")
        ext = make(False)

    class BuildNative(BuildExtension):
        """Falls back from CUDA+C++ to C++ alone, then to no extension, instead of failing the install."""

        def build_extensions(self):
            ext = self.extensions[0]
            attempts = ("CUDA + C++", "C++") if with_cuda else ("C++",)
            for what in attempts:
                if what == "C++" and with_cuda:  # retarget the finalized extension at the CPU sources
                    for key, val in vars(make(False)).items():
                        if not key.startswith("_"):
                            setattr(ext, key, val)
                try:
                    super().build_extensions()
                    return
                except Exception as e:  # compiler missing or broken, CUDA/torch mismatch, ...
                    _say(f"building the {what} extension failed: {type(e).__name__}: {e}")
            _say("installing without dvpo_kernels._C; `python -m dvpo_kernels` reports the native backend "
                 "as unavailable")
            self.extensions = []

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildNative.with_options(use_ninja=True)}}


setup(**_extension_setup())
