import os

import pytest

# Triton tests come in two kinds (marker ``triton``): CPU-tensor ones that need the Triton
# interpreter, and ``gpu`` ones that need compiled kernels. TRITON_INTERPRET must be decided
# before triton decorates any kernel, i.e. before the test modules import dvpo_kernels, and it
# holds for the whole session: it is on without CUDA, or when the selected tests include no
# ``gpu`` Triton test (plain ``pytest`` on a GPU machine); off for ``pytest -m gpu``. A test of
# the other kind skips with the reason. A TRITON_INTERPRET set by the caller is kept.


def _selects(markexpr: str, markers: set) -> bool:
    from _pytest.mark.expression import Expression

    return not markexpr or Expression.compile(markexpr).evaluate(lambda name, **kw: name in markers)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: runs Triton kernels (under the interpreter unless also gpu)")
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available() or not _selects(config.option.markexpr, {"gpu", "triton"}):
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_runtest_setup(item):
    if item.get_closest_marker("triton") is None:
        return
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if item.get_closest_marker("gpu") is not None and interpreting:
        pytest.skip("a Triton GPU test needs compiled kernels, and this session runs the Triton interpreter "
                    "(TRITON_INTERPRET=1); run it with `python -m pytest -m gpu`")
    if item.get_closest_marker("gpu") is None and not interpreting:
        pytest.skip("a CPU-tensor Triton test needs the Triton interpreter, and this session compiles the kernels "
                    "for the GPU; plain `python -m pytest` runs it")


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory):
    """A tiny SFT policy (``final/`` folder with its tokenizer) from examples/sft_tiny.yaml on HH data."""
    from _stages import HH, TINY, run_stage

    if not HH.is_file():
        pytest.skip("shared HH data not present")
    out = tmp_path_factory.mktemp("sft") / "run"
    run_stage("sft", "sft_tiny", out, **{**TINY, "data.train": str(HH), "data.limit": "96", "train.batch_size": "16",
                                       "train.max_steps": "12", "train.lr": "3e-3", "train.save_every": "0"})
    return out / "final"


@pytest.fixture(scope="session")
def gvm_model(sft_model, tmp_path_factory):
    """A tiny GVM on the SFT backbone (examples/gvm_tiny.yaml), sharing its tokenizer."""
    from _stages import HH, TINY, run_stage

    out = tmp_path_factory.mktemp("gvm") / "run"
    run_stage("gvm", "gvm_tiny", out, **{**TINY, "model.path": str(sft_model), "data.pairs": str(HH),
                                        "data.limit": "48", "train.batch_size": "8", "train.max_steps": "4",
                                        "train.save_every": "0", "train.eval_every": "0"})
    return out / "final"
