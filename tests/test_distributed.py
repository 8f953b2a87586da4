"""Two gloo processes on CPU: dvpo under torchrun with FSDP2 (the policy alone, or the frozen reference and
GVM too) and with replicas; every rank ends with the
same weights, the sharded run trains the same model as the replicated one, evaluation with uneven shares
does not hang, and batch whitening uses every rank's rows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _stages import HH
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("_dist_worker.py")


def torchrun(out: Path, mode: str, sft: Path, gvm: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), mode, str(sft), str(gvm), str(HH)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "ranks.json").read_text())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_fsdp2_and_replicas_agree(sft_model, gvm_model, tmp_path):
    fsdp = torchrun(tmp_path / "fsdp", "fsdp", sft_model, gvm_model)
    replicas = torchrun(tmp_path / "replicate", "replicate", sft_model, gvm_model)
    all_sharded = torchrun(tmp_path / "fsdp_frozen", "fsdp+frozen", sft_model, gvm_model)
    common = {"max_rank_difference": 0.0, "world_size": 2, "whiten_error_below_1e-5": True}
    assert fsdp == {**common, "parallel": "fsdp"}
    assert replicas == {**common, "parallel": "replicate"}
    assert all_sharded == {**common, "parallel": "fsdp"}
    # 3 held-out prompts over 2 ranks: the shorter share is padded, the mean counts real prompts only
    evals = json.loads((tmp_path / "fsdp" / "eval.json").read_text())
    assert evals["eval/prompts"] == 3
    a = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "replicate" / "final" / "model.safetensors"))
    start = load_file(str(sft_model / "model.safetensors"))
    assert a.keys() == b.keys() == start.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    c = load_file(str(tmp_path / "fsdp_frozen" / "final" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-5)
    saved = json.loads((tmp_path / "fsdp" / "global_step_2" / "trainer_state.json").read_text())
    assert saved["step"] == 2


def torchrun_stage(out: Path, stage: str, example: str, **overrides) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(out), "stage", stage, example,
           json.dumps({"train.progress_bar": "false", "train.device": "cpu", **overrides})]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "ranks.json").read_text())


def _pairs(sft: Path, **kw) -> dict:
    return {"model.path": str(sft), "data.pairs": str(HH), "data.limit": "24", "data.max_length": "96",
            "data.truncation": "prompt_left", "data.eval_fraction": "0.25", "train.batch_size": "4",
            "train.max_steps": "2", "train.save_every": "2", **kw}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_gvm_rm_and_ppo_shard_with_fsdp2(sft_model, tmp_path):
    """Every stage trains FSDP2-sharded under torchrun: gvm, rm, then ppo with the rm as its reward model
    (policy and critic each sharded, the frozen reward model and reference too); sharded checkpoints, and
    exports that load with from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    sharded = {"world_size": 2, "parallel": "fsdp"}
    assert torchrun_stage(tmp_path / "gvm", "gvm", "gvm_tiny", **_pairs(sft_model)) == sharded
    assert torchrun_stage(tmp_path / "rm", "rm", "rm_tiny", **_pairs(sft_model)) == sharded
    for run in ("gvm", "rm"):
        assert json.loads((tmp_path / run / "eval.json").read_text())["eval/pairs"] > 0
        assert (tmp_path / run / "global_step_2" / "shards" / ".metadata").is_file()
        AutoModelForTokenClassification.from_pretrained(tmp_path / run / "final")
    ppo = {"model.path": str(sft_model), "reward.path": str(tmp_path / "rm" / "final"), "data.prompts": str(HH),
           "data.limit": "40", "data.max_prompt_length": "24", "data.eval_size": "3", "rollout.max_new_tokens": "6",
           "train.batch_size": "4", "actor.mini_batch_size": "2", "train.max_steps": "2", "train.save_every": "2",
           "train.shard_frozen": "true"}
    assert torchrun_stage(tmp_path / "ppo", "ppo", "ppo_tiny", **ppo) == sharded
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("critic/vf_loss" in r for r in rows)
    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "final")
    AutoModelForTokenClassification.from_pretrained(tmp_path / "ppo" / "final" / "critic")
    # replicas (policy and critic each averaging gradients in buckets, accumulated over micro-batches) train
    # the same two models as the shards
    replicas = {**ppo, "train.parallel": "replicate", "train.shard_frozen": "false", "train.micro_batch_size": "1"}
    assert torchrun_stage(tmp_path / "ppo_replicas", "ppo", "ppo_tiny", **replicas)["parallel"] == "replicate"
    for part in ("model.safetensors", "critic/model.safetensors"):
        a = load_file(str(tmp_path / "ppo" / "final" / part))
        b = load_file(str(tmp_path / "ppo_replicas" / "final" / part))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_merged_lora_state_dict_equals_merge_and_unload():
    """What a sharded LoRA run exports: the gathered state with W + (alpha / r) B A, under the base keys."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from dvpo.models import ModelConfig, apply_lora
    from dvpo.models.lora_merge import merged_state_dict

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, tie_word_embeddings=False)
    peft_model = apply_lora(AutoModelForCausalLM.from_config(config), ModelConfig(lora_r=4, lora_alpha=8.0),
                            trainable_heads=())
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # zeros at init would merge to nothing
    merged = merged_state_dict(peft_model.state_dict(), peft_model)
    expected = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_lora_policy_trains_sharded(sft_model, gvm_model, tmp_path):
    lora = torchrun(tmp_path / "lora", "fsdp+lora", sft_model, gvm_model)
    assert lora == {"max_rank_difference": 0.0, "world_size": 2, "whiten_error_below_1e-5": True, "parallel": "fsdp"}
    merged = load_file(str(tmp_path / "lora" / "final" / "model.safetensors"))
    start = load_file(str(sft_model / "model.safetensors"))
    assert merged.keys() == start.keys()  # adapters merged into the base weights
    assert any(not torch.equal(merged[k], start[k]) for k in merged)
