"""``python -m dvpo_kernels --deps``: installed versions against the declared floors and the newest tested."""
import subprocess
import sys

from dvpo_kernels import _deps

REQUIRES = [
    "torch>=2.6",
    'transformers>=4.56.2; extra == "train"',
    'tokenizers>=0.20; extra == "train"',
    'triton>=3.0; extra == "triton"',
    'triton>=3.9; extra == "test"',
    'peft>=0.13; extra == "lora"',
    'liger-kernel>=0.6; extra == "bench"',
    'dvpo[train]; extra == "test"',
]
EXTRAS = ["train", "triton", "lora", "test", "bench"]
NEWEST = {"torch": "2.13.0", "transformers": "5.24.0", "triton": "3.9.0", "peft": "0.21.2"}


def _rows(**installed):
    rows = _deps.check(REQUIRES, EXTRAS, lambda name: installed.get(name.replace("-", "_")), NEWEST)
    return {r.name: r for r in rows}


def test_statuses_and_what_fails():
    rows = _rows(torch="2.13.0+cu130", transformers="5.25.0", tokenizers="0.19.1", triton="3.6.0", peft="0.12")
    assert (rows["torch"].status, rows["torch"].failed) == ("ok", False)  # local label ignored
    assert (rows["transformers"].status, rows["transformers"].failed) == ("newer than tested", False)
    assert rows["transformers"].floor == "4.56.2" and rows["transformers"].newest == "5.24.0"
    assert (rows["tokenizers"].status, rows["tokenizers"].failed) == ("below floor", True)
    assert (rows["triton"].floor, rows["triton"].status) == ("3.0", "ok")  # the kernels' floor, not the tests'
    assert (rows["peft"].status, rows["peft"].failed) == ("below floor", True)  # optional but installed
    assert (rows["liger-kernel"].status, rows["liger-kernel"].failed) == ("missing (optional, extra bench)", False)
    assert "dvpo" not in rows


def test_missing_required_package_fails():
    rows = _rows(torch="2.13.0", tokenizers="0.23.3")
    assert (rows["transformers"].status, rows["transformers"].failed) == ("missing (required)", True)
    assert not rows["triton"].failed and not rows["torch"].failed


def test_cli_prints_every_package_and_exits_by_the_check():
    out = subprocess.run([sys.executable, "-m", "dvpo_kernels", "--deps"], capture_output=True, text=True,
                         timeout=120)
    rows = [line for line in out.stdout.splitlines()[2:] if line[:2] in ("  ", "! ", "~ ") and len(line.split()) > 3]
    lines = {line[2:].split()[0]: line for line in rows}
    for name in ("torch", "triton", "transformers", "tokenizers", "peft", "numpy", "safetensors"):
        assert name in lines, out.stdout
    failed = any(line.startswith("!") for line in lines.values())
    assert out.returncode == (1 if failed else 0), out.stdout + out.stderr
