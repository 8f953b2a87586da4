"""Scoring policies on a task with a known oracle: sampled responses, oracle reward, KL to the reference."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ..models import PolicyModel
from ..rl import Experience, policy_logprobs
from ..rollout import generate
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


@torch.no_grad()
def oracle_scores(model: torch.nn.Module, reference: torch.nn.Module, tokenizer, task: OracleTask, prompts: list[str],
                  *, max_new_tokens: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> dict:
    """Mean oracle reward r*(x, y), sequence KL estimate ``sum_t log pi(y_t) - log pi_ref(y_t)`` and response
    length (EOS included) of one sampled response per prompt; the same seed draws the same noise for
    every policy."""
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    totals = {"reward": 0.0, "kl": 0.0, "length": 0.0}
    policy, ref = PolicyModel(model), PolicyModel(reference)
    for start in range(0, len(prompts), batch_size):
        texts = prompts[start:start + batch_size]
        ids = [tokenizer.encode(t) for t in texts]
        rollout = generate(model, ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id, temperature=temperature, generator=generator)
        exp = Experience.from_rollout(rollout)
        logp = policy_logprobs(policy, exp, temperature=temperature, micro=0)
        ref_logp = policy_logprobs(ref, exp, temperature=temperature, micro=0)
        totals["kl"] += float(torch.where(exp.mask, logp - ref_logp, 0.0).sum())
        totals["length"] += float(exp.mask.sum())
        for b, text in enumerate(texts):
            response = tokenizer.decode(exp.targets[b, :exp.lengths[b]].tolist(), skip_special_tokens=True)
            totals["reward"] += task.reward(text, response)
    return {k: v / len(prompts) for k, v in totals.items()}
