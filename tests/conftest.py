import os

# Triton kernels run under the interpreter on CPU-only machines; the flag must be set before
# triton decorates any kernel, so it is set before the package is imported.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


import pytest  # noqa: E402


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
