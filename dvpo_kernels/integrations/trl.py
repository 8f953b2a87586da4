"""TRL adapter.

* ``use_dvpo_kernels()``: one line that makes TRL's fused LM head (``add_fused_lm_head``, which every TRL
  trainer uses for its per-token log-probs and entropies) run ``linear_logprobs`` instead of TRL's own
  ``_ChunkedLogProbFunction``.
* ``DVPOTrainer`` / ``DVPOConfig``: ``GRPOTrainer`` trained with token-level advantages from a frozen
  Global Value Model (``dvpo_advantages``: per-sequence whitened values, the adaptive KL penalty as
  per-token reward, GAE, whitened advantages) and ``fused_policy_loss`` inside the model's forward (the
  policy loss computed in the LM-head kernel, no per-token log-prob tensor kept for the backward).

It lives here rather than in the ``dvpo`` trainer layer because it needs only trl, transformers and our ops.
"""
from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass, field

import torch
import trl.trainer.utils as trl_utils
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from .. import functional as F
from .transformers import _backbone, lm_head_params, logit_transform

_OUTPUTS = ("log_probs", "entropy")


class ChunkedLogProbs:
    """TRL's ``_ChunkedLogProbFunction.apply`` contract on ``linear_logprobs``: returns
    ``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)``; only the first two are computed."""

    @staticmethod
    def apply(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
              chunk_size: int, final_logit_softcapping: float | None = None, logit_scale: float = 1.0,
              outputs: tuple[str, ...] = _OUTPUTS):
        extra = sorted(set(outputs) - set(_OUTPUTS))
        if extra:
            raise ValueError(f"outputs: the dvpo kernel computes log_probs and entropy only, not {extra}")
        kw = {}
        if final_logit_softcapping is not None:
            kw["logit_softcap"] = float(final_logit_softcapping)
        if logit_scale != 1.0:
            kw["logit_scale"] = float(logit_scale)
        want_entropy = "entropy" in outputs
        out = F.linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                return_entropy=want_entropy, **kw)
        logp, entropy = out if want_entropy else (out, None)
        return logp, entropy, None, None, None


def use_dvpo_kernels():
    """Route TRL's fused LM head through ``linear_logprobs``; returns the kernel it replaced."""
    previous = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = ChunkedLogProbs
    return previous


@dataclass
class DVPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the DVPO advantage recipe. ``beta`` (KL in the loss) stays GRPO's; DVPO puts
    the KL into the per-token reward with an adaptive coefficient (Ziegler et al.)."""

    kl_coef: float = field(default=0.05, metadata={"help": "Initial coefficient of the per-token KL reward."})
    target_kl: float | None = field(default=6.0, metadata={"help": "Adaptive KL target per sequence; None: fixed."})
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon of the adaptive KL controller."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of the GAE scan."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    value_norm: str = field(default="seq", metadata={"help": "Whitening of the GVM values: seq, batch or none."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten the advantages over the batch."})


# GRPO loss types the fused loss reproduces, as dvpo loss_agg modes
LOSS_AGGS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum",
             "dapo": "token-mean"}


def zero_reward(completions, **_):
    """GRPO needs a reward function; in DVPO the GVM is the only signal."""
    return [0.0] * len(completions)


def _add_head_call(model):
    """``model(input_ids, attention_mask, dvpo_head=fn)`` returns ``fn(hidden, lm_head.weight, lm_head.bias)``
    from inside the forward (so FSDP/DDP wrappers see a normal forward); other calls are unchanged."""
    previous = model.forward

    @functools.wraps(previous)
    def forward(self, *args, dvpo_head=None, **kwargs):
        if dvpo_head is None:
            return previous(*args, **kwargs)
        hidden = _backbone(self)(*args, use_cache=False, **kwargs).last_hidden_state
        weight, bias = lm_head_params(self)
        return dvpo_head(hidden, weight, bias)

    model.forward = types.MethodType(forward, model)


class DVPOTrainer(GRPOTrainer):
    """``DVPOTrainer(model, gvm_model, args=DVPOConfig(...), train_dataset=..., processing_class=...)``.

    ``gvm_model``: a ``*ForTokenClassification`` with one label (our GVM export), kept frozen.
    ``reward_funcs`` defaults to a zero reward; a real one adds its score on each completion's last token.
    Loss types: ``grpo``, ``bnpo``, ``dr_grpo``, ``dapo`` (token-level importance sampling).
    """

    _tag_names = ["trl", "dvpo"]

    def __init__(self, model, gvm_model, reward_funcs=None, args: DVPOConfig | None = None, **kwargs):
        if args is None or not isinstance(args, DVPOConfig):
            raise ValueError("args must be a DVPOConfig")
        if args.loss_type not in LOSS_AGGS:
            raise ValueError(f"args.loss_type must be one of {tuple(LOSS_AGGS)}, got {args.loss_type!r}")
        if args.importance_sampling_level != "token":
            raise ValueError("args.importance_sampling_level must be 'token': DVPO advantages are per token")
        if args.value_norm not in ("seq", "batch", "none"):
            raise ValueError(f"args.value_norm must be 'seq', 'batch' or 'none', got {args.value_norm!r}")
        if isinstance(model, str):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model, **(args.model_init_kwargs or {}))
        frozen_ref = None if hasattr(model, "disable_adapter") else copy.deepcopy(model)
        super().__init__(model, reward_funcs if reward_funcs is not None else zero_reward, args=args, **kwargs)
        self.kl_coef = args.kl_coef
        self.gvm_model = self._frozen(gvm_model)
        self.dvpo_ref_model = None if frozen_ref is None else self._frozen(frozen_ref)
        if self.dvpo_ref_model is not None:
            trl_utils.add_fused_lm_head(self.dvpo_ref_model, temperature=self.temperature)
        _add_head_call(self.accelerator.unwrap_model(self.model).get_base_model()
                       if hasattr(self.model, "get_base_model") else self.accelerator.unwrap_model(self.model))

    def _frozen(self, model):
        model.requires_grad_(False)
        return self.accelerator.prepare_model(model.eval(), evaluation_mode=True)

    @torch.no_grad()
    def _reference_logps(self, input_ids, attention_mask, logits_to_keep):
        if self.dvpo_ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.dvpo_ref_model, input_ids, attention_mask,
                                                           logits_to_keep)[0]
        with self.accelerator.unwrap_model(self.model).disable_adapter():
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep)[0]

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        width = out["completion_ids"].shape[1]
        mask = out["completion_mask"].bool()
        if "tool_mask" in out:
            mask = mask & out["tool_mask"].bool()
        with torch.no_grad():
            if "old_per_token_logps" not in out:
                out["old_per_token_logps"] = self._get_per_token_logps_and_entropies(self.model, ids, attn, width)[0]
            old = out["old_per_token_logps"]
            ref = self._reference_logps(ids, attn, width)
            gvm = self.accelerator.unwrap_model(self.gvm_model)
            # row t of the GVM states is s_t, the position before completion token t
            hidden = _backbone(gvm)(input_ids=ids, attention_mask=attn).last_hidden_state[:, -width - 1:-1]
            score = out["advantages"] if self.reward_funcs[0] is not zero_reward else None
            head = gvm.score
            adv, _, values = F.dvpo_advantages(hidden, head.weight, head.bias, mask, old_logprobs=old,
                                               ref_logprobs=ref, kl_coef=self.kl_coef,
                                               score=None if score is None else score.float(),
                                               gamma=self.args.gamma, lam=self.args.lam,
                                               value_norm=self.args.value_norm,
                                               whiten_advantages=self.args.whiten_advantages)
        out["advantages"] = adv
        mode = "train" if self.model.training else "eval"
        seq_kl = ((old - ref) * mask).sum(-1).mean()
        metrics = self._metrics[mode]
        metrics["objective/kl"].append(self.accelerator.gather(seq_kl).mean().item())
        metrics["objective/kl_coef"].append(self.kl_coef)
        metrics["objective/values_mean"].append(self.accelerator.gather(values[mask].mean()).mean().item())
        if mode == "train" and self.args.target_kl is not None:
            n = mask.shape[0] * self.accelerator.num_processes
            err = max(-0.2, min(0.2, metrics["objective/kl"][-1] / self.args.target_kl - 1))
            self.kl_coef *= 1 + err * n / self.args.kl_horizon
        return out

    def _compute_loss(self, model, inputs):
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        width = completion_ids.shape[1]
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        agg = {"loss_agg": LOSS_AGGS[self.loss_type]}
        if self.loss_type == "dr_grpo":
            # Dr. GRPO: row sums over the batch size times the constant max_completion_length
            agg["normalizer"] = float(mask.shape[0] * self.max_completion_length)
        elif self.loss_type == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            agg["normalizer"] = n * accum / self.args.steps_per_generation if mode == "train" else n
            accum = 1.0
        beta = self.beta
        # Gemma 2/3 and Cohere heads: the same logit transform as their own forward
        transform = logit_transform(self.accelerator.unwrap_model(model).config)

        def head(hidden, weight, bias):
            return F.fused_policy_loss(hidden[:, -width - 1:-1], weight, completion_ids,
                                       inputs["old_per_token_logps"], inputs["advantages"], mask, bias=bias,
                                       temperature=self.temperature, clip_low=self.epsilon_low,
                                       clip_high=self.epsilon_high, ref_logprobs=inputs.get("ref_per_token_logps"),
                                       kl_coef=beta, **transform, **agg)

        ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
        attn = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        loss, metrics = model(input_ids=ids, attention_mask=attn, dvpo_head=head)
        self._metrics[mode]["clip_ratio/region_mean"].append(self.accelerator.gather(metrics["clipfrac"]).mean().item())
        if beta != 0.0:
            self._metrics[mode]["kl"].append(self.accelerator.gather(metrics["kl"]).mean().item())
        return loss / accum
