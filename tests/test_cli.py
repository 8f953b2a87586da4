"""The dvpo command line and the typed config machinery."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from dvpo.cli import main, parse_args
from dvpo.config import ConfigError, coerce, help_text, load_config, option, section
from dvpo.stages import STAGES
from dvpo.stages.gvm import GVMStageConfig

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@dataclass
class Inner:
    size: int = option(4, "a size")
    names: list[str] = option(default_factory=list, help="some names")
    mode: str = option("a", "a mode")


@dataclass
class Outer:
    inner: Inner = section(Inner, "the inner section")
    rate: float = option(0.5, "a rate")
    cap: int | None = option(None, "an optional cap")
    flag: bool = option(False, "a flag")
    file: str | None = option(None, "a file", path=True)


def test_yaml_then_overrides_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("inner:\n  size: 8\n  names: [x, y]\nrate: 1e-3\nfile: data/a.jsonl\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("")  # input paths must exist
    cfg = load_config(Outer, cfg_file, [("inner.size", "16"), ("cap", "3"), ("flag", "true"), ("inner.names", "a,b")])
    assert (cfg.inner.size, cfg.inner.names, cfg.rate, cfg.cap, cfg.flag) == (16, ["a", "b"], 1e-3, 3, True)
    assert cfg.file == str(tmp_path / "data" / "a.jsonl")  # relative to the current directory
    assert load_config(Outer, None, [("cap", "null"), ("inner.mode", "none")]).inner.mode == "none"


def test_bad_keys_and_values_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.sise' \(did you mean 'inner.size'\?\)"):
        load_config(Outer, None, [("inner.sise", "3")])
    with pytest.raises(ConfigError, match="inner.size: cannot use 'big' as INT"):
        load_config(Outer, None, [("inner.size", "big")])
    with pytest.raises(ConfigError, match="a section"):
        load_config(Outer, None, [("inner", "3")])
    with pytest.raises(ConfigError, match="null is not allowed"):
        coerce("rate", None, float)
    with pytest.raises(ConfigError, match=r"train.batch_size must be > 0"):
        load_config(GVMStageConfig, None, [("data.pairs", "x.jsonl"), ("train.batch_size", "0")])
    with pytest.raises(ConfigError, match="'sgd' is not one of cosine, linear, constant"):
        load_config(GVMStageConfig, None, [("data.pairs", "x.jsonl"), ("train.lr_schedule", "sgd")])
    with pytest.raises(ConfigError, match="data.pairs or data.scored"):
        load_config(GVMStageConfig)


def test_parse_args_forms():
    config, overrides, flags = parse_args(["cfg.yaml", "a.b=1", "--c.d", "2", "--e=3", "--flag", "--print-config"])
    assert config == "cfg.yaml" and flags == {"print-config"}
    assert overrides == [("a.b", "1"), ("c.d", "2"), ("e", "3"), ("flag", "true")]
    assert parse_args(["--config", "x.yaml", "-h"])[0::2] == ("x.yaml", {"help"})
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_args(["a.yaml", "b.yaml"])


def test_stage_help_documents_every_field(capsys):
    assert "gvm" in STAGES
    assert main(["gvm", "--help"]) == 0
    text = capsys.readouterr().out

    def keys(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                yield from keys(value, prefix + f.name + ".")
            else:
                yield prefix + f.name

    documented = list(keys(GVMStageConfig()))
    assert len(documented) > 50
    for key in documented:
        assert f"--{key} " in text, key
    assert "(default: runs/gvm)" in text and "preference JSONL files" in text
    lines = help_text(Outer).splitlines()
    assert lines[:2] == ["inner:  the inner section", "  --inner.size INT                a size (default: 4)"]
    assert "  --cap INT|null                  an optional cap (default: null)" in lines


def test_cli_errors_and_print_config(capsys, tmp_path):
    assert main(["nope"]) == 2
    assert main(["gvm", "--train.lrr", "1"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main([]) == 0 and "gvm" in capsys.readouterr().out
    assert main(["gvm", "data.pairs=missing.jsonl", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "data.pairs[0]: no such file or folder" in capsys.readouterr().err
    assert main(["gvm", str(REPO / "examples" / "gvm_tiny.yaml"), "--print-config", "train.lr=0.5"]) == 0
    printed = capsys.readouterr().out
    assert "lr: 0.5" in printed and "hh-rlhf-harmless-base-test.jsonl.gz" in printed


@pytest.mark.skipif(not HH.is_file(), reason="shared HH data not present")
def test_cli_trains_the_example_config_briefly(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the example's data path is relative to the repository root
    out = tmp_path / "run"
    rc = main(["gvm", "--config", "examples/gvm_tiny.yaml", "--data.limit", "24", "--data.max_length", "128",
               "--data.truncation", "prompt_left",
               "--train.batch_size", "4", "--train.max_steps", "2", "--train.progress_bar", "false",
               "--model.hidden_size", "32", "--model.vocab_size", "300", "--model.path", "null",
               f"train.output_dir={out}"])
    assert rc == 0
    assert {"config.yaml", "metrics.jsonl", "eval.json", "data_stats.json", "train.log", "final"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "eval.json").read_text())["step"] == 2
    assert (out / "global_step_2" / "model.safetensors").is_file()
