"""verl adapter. verl imports it through ``actor_rollout_ref.model.external_lib=dvpo_kernels.integrations.verl``
(or ``VERL_USE_EXTERNAL_MODULES``); importing it

* registers the clipped policy loss ``dvpo`` (``actor.policy_loss.loss_mode=dvpo``): verl's signature,
  metric names, every ``loss_agg_mode`` and ``rollout_is_weights``, computed by ``dk.policy_loss``;
* registers the advantage estimators ``dvpo_gae`` (verl's GAE numbers: masked GAE, whitened advantages)
  and ``dvpo`` (the DVPO recipe: the frozen critic's values whitened per sequence first), both taking
  ``values``. verl hands ``values`` only to its built-in ``gae`` branch, which calls
  ``core_algos.compute_gae_advantage_return`` through the module on each call (legacy and v1 trainers
  alike), so that function is rebound: ``adv_estimator=gae`` then runs ``dvpo_gae``, or ``dvpo`` when
  ``DVPO_VALUE_NORM`` is ``seq`` or ``batch`` in the driver's environment;
* adds the fused-kernel backend ``dvpo``: with ``actor_rollout_ref.model.use_fused_kernels=True`` and
  ``+actor_rollout_ref.model.fused_kernel_options.impl_backend=dvpo`` the actor's forward returns
  ``CausalLMOutputForPPO(log_probs, entropy)`` from ``linear_logprobs``, never the logits.

It also holds ``zero_score``, the reward function of the DVPO recipe (the GVM is the only signal; the
per-token reward is the KL penalty verl adds with ``use_kl_in_reward``).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor
from verl.models.transformers import monkey_patch
from verl.models.transformers.dense_common import CausalLMOutputForPPO
from verl.trainer.ppo import core_algos

from .. import functional as F
from .transformers import _backbone, token_logprobs

BACKEND = "dvpo"


# --- policy loss -------------------------------------------------------------------------------

def agg_options(loss_agg_mode: str, mask: Tensor, global_batch_info: dict | None = None) -> dict:
    """verl's ``agg_loss(mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)`` as the
    ``loss_agg`` / ``normalizer`` keywords of ``dk.policy_loss``."""
    info = dict(global_batch_info or {})
    dp = info.get("dp_size", 1) or 1
    if loss_agg_mode in ("token-mean", "token-sum"):
        tokens = info.get("batch_num_tokens") if loss_agg_mode == "token-mean" else 1
        return {"loss_agg": "token-mean", "normalizer": None if tokens is None else _number(tokens) / dp}
    if loss_agg_mode not in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        raise ValueError(f"loss_agg_mode must be one of verl's modes, got {loss_agg_mode!r}")
    seqs = info.get("global_batch_size")
    if loss_agg_mode != "seq-mean-token-sum-norm":
        return {"loss_agg": loss_agg_mode, "normalizer": None if seqs is None else _number(seqs) / dp}
    # verl: the sequence mean (over non-empty rows, or the global batch) of row sums, over a constant
    rows = (mask.sum(-1) > 0).sum().clamp(min=1) if seqs is None else _number(seqs) / dp
    scale = info.get("loss_scale_factor") or mask.shape[-1]
    return {"loss_agg": "seq-mean-token-sum", "normalizer": rows * scale}


def _number(x) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


@core_algos.register_policy_loss(BACKEND)
def compute_policy_loss_dvpo(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                             loss_agg_mode: str = "token-mean", config=None,
                             rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict]:
    """verl's ``vanilla`` clipped loss (dual clip ``clip_ratio_c`` on negative advantages) on our kernel."""
    if config is None:
        raise ValueError("config (verl's actor config) is required")
    clip = config.get("clip_ratio", 0.2)
    low, high = config.get("clip_ratio_low", None), config.get("clip_ratio_high", None)
    loss, m = F.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                            clip_low=clip if low is None else low, clip_high=clip if high is None else high,
                            dual_clip=config.get("clip_ratio_c", 3.0), is_weights=rollout_is_weights,
                            **agg_options(loss_agg_mode, response_mask, config.get("global_batch_info", None)))
    metrics = {"actor/pg_clipfrac": m["clipfrac"].item(), "actor/ppo_kl": m["ppo_kl"].item(),
               "actor/pg_clipfrac_lower": m["clipfrac_lower"].item()}
    return loss, metrics


# --- advantages --------------------------------------------------------------------------------

@core_algos.register_adv_est("dvpo_gae")
def compute_dvpo_gae(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma=1.0, lam=0.95,
                     value_norm: str = "none", **_):
    """verl's GAE (``compute_gae_advantage_return``): masked GAE, then advantages whitened over the
    batch. ``value_norm`` (``seq``/``batch``) whitens the values first, as DVPO does with its frozen GVM."""
    if value_norm == "seq":
        values = torch.stack([F.masked_whiten(v, m) for v, m in zip(values, response_mask)])
    elif value_norm == "batch":
        values = F.masked_whiten(values, response_mask)
    elif value_norm != "none":
        raise ValueError(f"value_norm must be 'seq', 'batch' or 'none', got {value_norm!r}")
    advantages, returns = F.gae(values, token_level_rewards, response_mask, gamma=_number(gamma), lam=_number(lam))
    return F.masked_whiten(advantages, response_mask), returns


@core_algos.register_adv_est(BACKEND)
def compute_dvpo_advantage(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor, gamma=1.0,
                           lam=0.95, **_):
    """The DVPO recipe on the frozen critic's values: per-sequence value whitening, GAE, whitening."""
    return compute_dvpo_gae(token_level_rewards, values, response_mask, gamma, lam, value_norm="seq")


verl_compute_gae_advantage_return = getattr(core_algos.compute_gae_advantage_return, "__verl__",
                                            core_algos.compute_gae_advantage_return)


def compute_gae_advantage_return(token_level_rewards: Tensor, values: Tensor, response_mask: Tensor,
                                 gamma, lam):
    """What verl's ``gae`` branch calls once this module is loaded (see the module doc)."""
    norm = os.environ.get("DVPO_VALUE_NORM", "none")
    return compute_dvpo_gae(token_level_rewards, values, response_mask, gamma, lam, value_norm=norm)


compute_gae_advantage_return.__verl__ = verl_compute_gae_advantage_return
core_algos.compute_gae_advantage_return = compute_gae_advantage_return
core_algos.ADV_ESTIMATOR_REGISTRY["gae"] = compute_gae_advantage_return


def zero_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, **_) -> float:
    """verl ``custom_reward_function`` of the DVPO recipe: no outcome reward."""
    return 0.0


# --- fused forward -----------------------------------------------------------------------------

def forward_with_dvpo_backend(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                              position_ids: Tensor | None = None, past_key_values=None,
                              inputs_embeds: Tensor | None = None, labels: Tensor | None = None,
                              use_cache: bool | None = None, output_attentions: bool | None = None,
                              output_hidden_states: bool | None = None, return_dict: bool | None = None,
                              cache_position: Tensor | None = None, logits_to_keep=0, temperature: float = 1.0,
                              shift_labels: Tensor | None = None, **loss_kwargs) -> CausalLMOutputForPPO:
    """verl's ``forward_with_torch_backend`` contract: targets are ``shift_labels``, else ``labels`` or
    ``input_ids`` rolled by one; every position is scored. Log-probs and entropies come from the final
    hidden states through ``linear_logprobs``."""
    out = _backbone(self)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          inputs_embeds=inputs_embeds, use_cache=False, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states)
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None or input_ids is not None:
        targets = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("input_ids, labels or shift_labels is required by the dvpo fused forward")
    log_probs, entropy = token_logprobs(self, out.last_hidden_state, targets, None, temperature=temperature,
                                        return_entropy=True)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, hidden_states=out.hidden_states,
                                attentions=out.attentions)


_verl_patch_forward = monkey_patch.patch_forward_with_backends


def patch_forward_with_backends(model, use_fused_kernels: bool = False, fused_kernels_backend: str | None = None):
    """verl's hook, plus the ``dvpo`` backend (text models; verl's own backends are unchanged)."""
    if use_fused_kernels and fused_kernels_backend == BACKEND:
        model._verl_fused_kernels_backend = BACKEND
        model.__class__.forward = forward_with_dvpo_backend
        return
    _verl_patch_forward(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)


monkey_patch.patch_forward_with_backends = patch_forward_with_backends
