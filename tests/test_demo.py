"""dvpo demo end to end at a tiny scale: every stage as its own process, the table, the plots."""
from __future__ import annotations

import json
import xml.dom.minidom

from dvpo.config import load_config
from dvpo.plot import line_chart
from dvpo.stages import demo

TINY_DEMO = {"task.sft_examples": "300", "task.pair_prompts": "160", "task.rl_prompts": "64", "task.eval_prompts": "16",
             "model.hidden_size": "32", "model.num_heads": "2", "schedule.sft_steps": "10", "schedule.value_steps": "6",
             "schedule.rl_steps": "4", "schedule.dpo_steps": "3", "schedule.eval_every": "2",
             "methods": "[dvpo,ppo,dpo,vpo]"}


def test_demo_runs_every_method_and_writes_the_table_and_plots(tmp_path):
    cfg = load_config(demo.DemoConfig, None, list({"output_dir": str(tmp_path), **TINY_DEMO}.items()))
    result = demo.run(cfg)
    assert set(result["methods"]) == {"sft", "dvpo", "ppo", "dpo", "vpo"}
    sft = result["methods"]["sft"]
    assert sft["kl"] == 0.0 and 1.0 <= sft["length"] <= 9.0  # the reference scored against itself
    for name, row in result["methods"].items():
        assert row["seconds_per_step"] > 0 and row["peak_rss_mb"] > 0, name
    assert [c["step"] for c in result["curves"]["DVPO"]] == [0, 2, 4]
    assert result["curves"]["PPO"][0]["reward"] == sft["reward"]
    assert [c["step"] for c in result["curves"]["DPO"]] == [0, 2, 3]  # DPO and VPO give curves too
    eq = result["equal_kl"]
    assert set(eq["reward"]) == {"DVPO", "PPO", "DPO", "VPO"}
    assert eq["kl"] == min(max(c["kl"] for c in curve) for curve in result["curves"].values())
    assert all(r is not None for r in eq["reward"].values())
    # the GVM and the reward model make the same updates on the same pairs
    assert result["epochs"]["gvm"] == result["epochs"]["rm"] > 0 and result["epochs"]["dpo"] > 0
    assert 0.0 <= result["accuracy"]["gvm_pair_acc"] <= 1.0 and 0.0 <= result["accuracy"]["rm_pair_acc"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text())["optimum_reward"] == result["optimum_reward"]
    table = (tmp_path / "results.md").read_text()
    assert "| DVPO |" in table and "| PPO |" in table and "| VPO |" in table
    for plot in ("reward_vs_step.svg", "reward_vs_kl.svg"):
        xml.dom.minidom.parse(str(tmp_path / plot))
    # each stage's config is kept and reruns by hand: dvpo <stage> configs/<stage>.yaml
    assert {p.stem for p in (tmp_path / "configs").iterdir()} == {"sft", "gvm", "rm", "dvpo", "ppo", "dpo", "vpo"}


def test_line_chart_draws_one_polyline_per_series():
    svg = line_chart({"a": [(0, 1.0), (1, 2.0)], "b": [(0, 0.5), (2, 1.5)]}, title="t <x>", xlabel="x", ylabel="y",
                     hlines={"ref": 1.2})
    doc = xml.dom.minidom.parseString(svg)
    assert len(doc.getElementsByTagName("polyline")) == 2
    assert "t &lt;x&gt;" in svg


def test_equal_kl_interpolates_every_curve_at_the_largest_kl_all_reached():
    curves = {"A": [{"kl": 0.0, "reward": 1.0}, {"kl": 2.0, "reward": 3.0}, {"kl": 4.0, "reward": 4.0}],
              "B": [{"kl": 0.0, "reward": 1.0}, {"kl": 3.0, "reward": 2.5}]}
    eq = demo.equal_kl_rewards(curves)
    assert eq["kl"] == 3.0
    assert eq["reward"] == {"A": 3.5, "B": 2.5}
    assert demo.reward_at_kl(curves["B"], 3.5) is None  # never extrapolated
