"""benchmarks/quality/run_hh.py at --scale tiny: the gold-RM protocol through every stage, in seconds."""
from __future__ import annotations

import importlib.util
import json

from _stages import ROOT, needs_hh


@needs_hh
def test_run_hh_tiny_scale_reports_every_method(tmp_path):
    spec = importlib.util.spec_from_file_location("run_hh", ROOT / "benchmarks" / "quality" / "run_hh.py")
    run_hh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_hh)
    report = run_hh.main(["--scale", "tiny", "--seeds", "0", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "hh_tiny.json").read_text())
    assert saved["accuracy"] == report["accuracy"]
    assert set(saved["accuracy"]) == {"gvm_last", "gvm_mean", "proxy_rm", "gold_rm"}
    assert all(0.0 <= v["mean"] <= 1.0 for v in saved["accuracy"].values())
    assert set(saved["methods"]) == {"dvpo", "ppo", "dpo", "vpo"}
    for m in saved["methods"].values():
        assert [p["step"] for p in m["curve"]] == [0, 1] and m["seconds_per_step"] > 0
        assert m["curve"][-1]["samples"] and m["curve"][-1]["length"] > 0
    assert saved["equal_kl"]["kl"] == min(max(p["kl"] for p in m["curve"]) for m in saved["methods"].values())
    # the splits are disjoint: held-out prompts are never trained on
    data = {name: (tmp_path / "work" / "data" / f"{name}.jsonl").read_text().splitlines()
            for name in ("gold", "proxy", "heldout")}
    assert [len(v) for v in data.values()] == [48, 32, 8] and len(set(sum(data.values(), []))) == 88
    md = (tmp_path / "out" / "hh_tiny.md").read_text()
    assert "| DVPO |" in md and "gold RM" in md and (tmp_path / "out" / "hh_tiny_gold_vs_kl.svg").is_file()
