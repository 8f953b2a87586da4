"""Scoring policies on a task with a known oracle: sampled responses, oracle reward, KL to the reference."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ..models import PolicyModel
from ..rl import sample_and_score
from .oracle import OracleTask


def load_policy(folder: str | Path, base: str | Path, device: torch.device) -> torch.nn.Module:
    """A causal LM from an exported ``final/`` folder, or from a training checkpoint ``global_step_N/``
    (whose weights are the trainer's wrapper state: the policy's keys after ``module.``) on top of the
    architecture of ``base``."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(base)
    state = load_file(str(folder / "model.safetensors"))
    policy = {k.split("module.", 1)[1]: v for k, v in state.items() if k.startswith(("module.", "policy.module."))}
    model.load_state_dict(policy, strict=True)
    return model.to(device).eval()


def oracle_scores(model: torch.nn.Module, reference: torch.nn.Module, tokenizer, task: OracleTask, prompts: list[str],
                  *, max_new_tokens: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> dict:
    """Mean oracle reward r*(x, y), sequence KL to ``reference`` and response length of one sampled
    response per prompt (the same seed draws the same noise for every policy)."""
    rows = sample_and_score(PolicyModel(model), [tokenizer.encode(p) for p in prompts], tokenizer,
                            reference=PolicyModel(reference), max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed, batch_size=batch_size)
    rewards = [task.reward(p, r["response"]) for p, r in zip(prompts, rows)]
    return {"reward": sum(rewards) / len(rows), "kl": sum(r["kl"] for r in rows) / len(rows),
            "length": sum(r["length"] for r in rows) / len(rows)}
