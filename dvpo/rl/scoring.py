"""Sampling one response per prompt and scoring it: length, KL to a reference, value-model scores.
What ``dvpo eval`` and the demo's evaluation report."""
from __future__ import annotations

import torch

from ..models import PolicyModel, ValueModel
from ..models.policy import stop_token_ids
from ..rollout import RolloutEngine
from ..trainer import autocast, generation_autocast
from .experience import Experience, policy_logprobs, sequence_scores


@torch.no_grad()
def sample_and_score(policy: PolicyModel, prompts: list[list[int]], tokenizer, *, max_new_tokens: int,
                     reference: PolicyModel | None = None, judges: dict[str, ValueModel] | None = None,
                     temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, engine: str = "auto",
                     seed: int = 0, batch_size: int = 64, micro: int = 0, bf16: bool = False) -> list[dict]:
    """Per prompt: ``response`` (decoded), ``length`` (tokens, EOS included), ``kl`` (``sum_t log pi(y_t) -
    log pi_ref(y_t)``, with a reference) and ``score/<name>`` (each judge's score: a GVM's value of the last
    response state, a reward model's output at the final token). The
    same ``seed`` draws the same noise for every policy."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    rollouts = RolloutEngine(policy.hf_model, engine)
    stop_ids = stop_token_ids(policy.hf_model, tokenizer)
    rows = []
    for start in range(0, len(prompts), batch_size):
        with generation_autocast(device, bf16):
            rollout = rollouts.generate(prompts[start:start + batch_size], max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, top_k=top_k, generator=generator,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids)
        exp = Experience.from_rollout(rollout)
        columns = {"length": exp.mask.sum(-1).float()}
        with autocast(device, bf16):
            if reference is not None:
                logp = policy_logprobs(policy, exp, temperature=temperature, micro=micro)
                ref = policy_logprobs(reference, exp, temperature=temperature, micro=micro)
                columns["kl"] = torch.where(exp.mask, logp - ref, 0.0).sum(-1)
            for name, judge in (judges or {}).items():
                columns[f"score/{name}"] = sequence_scores(judge, exp, micro=micro)
        values = {k: v.tolist() for k, v in columns.items()}
        for b, n in enumerate(exp.lengths):
            response = tokenizer.decode(exp.targets[b, :n].tolist(), skip_special_tokens=True)
            rows.append({"response": response, **{k: v[b] for k, v in values.items()}})
    return rows
