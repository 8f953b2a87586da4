"""The public functional API: validation, shape handling, loss aggregation and metrics.

Per-token tensors may be [N] or [B, T] (then hidden is [B, T, H]). Statistics come back as
fp32 (fp64 when the inputs are fp64).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _backends, _checks as C, _ops
from ._params import KL_ALIASES, STAT_NAMES



# --- helpers ---------------------------------------------------------------------------------

def _need(*pairs) -> int:
    if not torch.is_grad_enabled():
        return 0
    return sum(flag for t, flag in pairs if t is not None and t.requires_grad)


def _check_hidden_weight(hidden, weight, bias, hidden_name="hidden", weight_name="weight"):
    C.tensor(hidden_name, hidden, ndim=(2, 3))
    C.tensor(weight_name, weight, ndim=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{weight_name} has shape {tuple(weight.shape)}: its second dim must equal "
                         f"the hidden size {hidden.shape[-1]} of {hidden_name}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{weight_name} dtype {weight.dtype} must match {hidden_name} dtype {hidden.dtype}")
    C.same_device(weight_name, weight, hidden.device)
    if weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have at least one vocab row")
    C.optional("bias", bias, (weight.shape[0],), f"{weight_name}'s vocab dim", hidden.device)


def _loss_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, loss_agg):
    clip_low = C.finite("clip_low", clip_low, lo=0.0, hi=1.0, hi_open=True)
    clip_high = C.finite("clip_high", clip_high, lo=0.0)
    if dual_clip is None:
        dual = 0.0
    else:
        dual = C.finite("dual_clip", dual_clip, lo=1.0, lo_open=True)
    kl_coef = C.finite("kl_coef", kl_coef)
    kl_type = KL_ALIASES.get(C.choice("kl_type", kl_type, C.KL_TYPES), kl_type)
    entropy_coef = C.finite("entropy_coef", entropy_coef)
    C.choice("loss_agg", loss_agg, C.LOSS_AGGS)
    return clip_low, clip_high, dual, kl_coef, kl_type, entropy_coef


def _logit_transform(logit_softcap, logit_scale):
    """(softcap, scale) as the ops take them: 0.0 = no soft-capping, 1.0 = no scale."""
    cap = 0.0 if logit_softcap is None else C.finite("logit_softcap", logit_softcap, lo=0.0, lo_open=True)
    scale = 1.0 if logit_scale is None else C.finite("logit_scale", logit_scale, lo=0.0, lo_open=True)
    return cap, scale


def _row_broadcast(name, t, shape, ref_name, device):
    """A per-token tensor of ``shape``, or for [B, T] tensors one value per row ([B]), broadcast."""
    C.tensor(name, t)
    C.same_device(name, t, device)
    if len(shape) == 2 and tuple(t.shape) == (shape[0],):
        return t[:, None].expand(shape).reshape(-1)
    if tuple(t.shape) != tuple(shape):
        rows = f" or {(shape[0],)} (one per row)" if len(shape) == 2 else ""
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the shape of {ref_name}){rows}")
    return t.reshape(-1)


def _token_weights(m, loss_agg, normalizer, loss_scale_factor, is_weights, shape, ref_name, sd, dev):
    """Flat per-token loss weights: the aggregation rule times the importance weights (no gradient)."""
    if loss_scale_factor is not None:
        if loss_agg != "seq-mean-token-sum-norm":
            raise ValueError(f"loss_scale_factor applies to loss_agg='seq-mean-token-sum-norm' only, got "
                             f"loss_agg={loss_agg!r}")
        loss_scale_factor = C.finite("loss_scale_factor", loss_scale_factor, lo=0.0, lo_open=True)
    if normalizer is not None and loss_agg == "seq-mean-token-sum-norm":
        raise ValueError("normalizer does not apply to loss_agg='seq-mean-token-sum-norm'; its constant is "
                         "loss_scale_factor")
    w = aggregation_weights(m, loss_agg, _normalizer(normalizer, sd, dev), sd, loss_scale_factor).reshape(-1)
    if is_weights is None:
        return w
    return w * _row_broadcast("is_weights", is_weights, shape, ref_name, dev).detach().to(sd)


def _normalizer(normalizer, dtype, device):
    if normalizer is None:
        return None
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
        return normalizer.reshape(()).to(device=device, dtype=dtype)
    return C.finite("normalizer", normalizer, lo=0.0, lo_open=True)


def aggregation_weights(mask: Tensor, loss_agg: str, normalizer=None, dtype=torch.float32,
                        loss_scale_factor=None) -> Tensor:
    """Per-token weights w with loss = sum(w * l): the ``loss_agg`` rule of DESIGN.md §3.2.

    ``normalizer`` replaces the final denominator: the token count for token-mean, the
    number of non-empty sequences for the seq-mean modes. A 1-D mask is one sequence.
    ``seq-mean-token-sum-norm`` is Dr. GRPO (DESIGN.md §3): every row's masked sum over one
    constant, ``loss_scale_factor`` (default: the mask's last dim, the horizon), then the mean
    over all rows (empty ones included: the constant, not the row, sets each row's scale).
    """
    m = mask.to(dtype)
    if loss_agg == "seq-mean-token-sum-norm":
        rows = m.shape[0] if m.dim() == 2 else 1
        return m / ((m.shape[-1] if loss_scale_factor is None else loss_scale_factor) * rows)
    if loss_agg == "token-mean":
        denom = m.sum().clamp(min=1.0) if normalizer is None else normalizer
        return m / denom
    rows = m if m.dim() == 2 else m[None]
    count = rows.sum(-1, keepdim=True)
    per_row = rows / count.clamp(min=1.0) if loss_agg == "seq-mean-token-mean" else rows
    denom = (count > 0).sum().to(dtype).clamp(min=1.0) if normalizer is None else normalizer
    return (per_row / denom).reshape(m.shape)


def _metrics(stats: Tensor, mask: Tensor, *, kl: bool, entropy: bool, dual: bool) -> dict:
    stats = stats.detach().float() / mask.sum().clamp(min=1).float()
    out = {name: stats[i] for i, name in enumerate(STAT_NAMES)}
    if not kl:
        del out["kl"]
    if not entropy:
        del out["entropy"]
    if not dual:
        del out["clipfrac_lower"]
    return out


def _per_token(name, t, shape, ref_name, device):
    C.tensor(name, t)
    C.same_shape(name, t, shape, ref_name)
    C.same_device(name, t, device)
    return t.reshape(-1)


# --- ops -------------------------------------------------------------------------------------

def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, return_entropy: bool = False, memory: str = "speed",
                    logit_softcap: float | None = None, logit_scale: float | None = None,
                    backend: str | None = None):
    """log_softmax((hidden @ weight.T + bias) / temperature)[targets], without a [N, V] tensor.

    ``logit_scale`` (Cohere) then ``logit_softcap`` (Gemma 2/3) act before the temperature:
    ``logits = softcap * tanh((hidden @ weight.T + bias) * scale / softcap)``.
    Returns ``logp`` (shape of ``targets``) or ``(logp, entropy)`` with ``return_entropy``.
    """
    hidden, weight, bias = _ops.autocast_operands(hidden, weight, bias)
    _check_hidden_weight(hidden, weight, bias)
    lead = hidden.shape[:-1]
    tgt = C.targets("targets", targets, lead, "hidden without its last dim", weight.shape[0], hidden.device)
    temperature = C.finite("temperature", temperature, lo=0.0, lo_open=True)
    C.choice("memory", memory, C.MEMORY_MODES)
    softcap, scale = _logit_transform(logit_softcap, logit_scale)
    name = _backends.resolve("linear_logprobs", backend, hidden.device)
    logp, ent, _ = _ops.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, tgt.reshape(-1), bias,
                                        temperature, bool(return_entropy), memory, name, softcap, scale)
    logp = logp.view(lead)
    return (logp, ent.view(lead)) if return_entropy else logp


def policy_loss(logprobs: Tensor, old_logprobs: Tensor | None, advantages: Tensor, mask: Tensor, *,
                ref_logprobs: Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                dual_clip: float | None = None, kl_coef: float = 0.0, kl_type: str = "k3",
                entropy: Tensor | None = None, entropy_coef: float = 0.0, loss_agg: str = "token-mean",
                normalizer=None, is_weights: Tensor | None = None, loss_scale_factor: float | None = None,
                backend: str | None = None):
    """PPO clipped surrogate (+ KL, - entropy bonus) aggregated by ``loss_agg``. Returns (loss, metrics).

    ``old_logprobs=None``: on-policy (ratio 1, the gradient of logp). ``advantages`` and
    ``is_weights`` (importance weights multiplying each token's loss, no gradient) may be [B]
    for [B, T] log-probs. ``kl_type`` also takes verl's names: kl (= k1), mse (= k2), abs,
    low_var_kl (k3 with verl's clamps).
    """
    C.tensor("logprobs", logprobs, ndim=(1, 2))
    shape, dev = logprobs.shape, logprobs.device
    params = _loss_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, loss_agg)
    old = (logprobs.detach().reshape(-1) if old_logprobs is None
           else _per_token("old_logprobs", old_logprobs, shape, "logprobs", dev))
    adv = _row_broadcast("advantages", advantages, shape, "logprobs", dev)
    m = C.mask("mask", mask, shape, "logprobs", dev)
    ref = None if ref_logprobs is None else _per_token("ref_logprobs", ref_logprobs, shape, "logprobs", dev)
    ent = None if entropy is None else _per_token("entropy", entropy, shape, "logprobs", dev)
    sd = C.stat_dtype(logprobs)
    w = _token_weights(m, loss_agg, normalizer, loss_scale_factor, is_weights, shape, "logprobs", sd, dev)
    name = _backends.resolve("policy_loss", backend, dev)
    loss, stats, _, _ = _ops.policy_loss(logprobs.reshape(-1), ent, old, adv, w, m.reshape(-1), ref,
                                         *params, name)
    return loss, _metrics(stats, m, kl=ref is not None, entropy=ent is not None, dual=dual_clip is not None)


def fused_policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor | None,
                      advantages: Tensor, mask: Tensor, *, bias: Tensor | None = None,
                      temperature: float = 1.0, ref_logprobs: Tensor | None = None, clip_low: float = 0.2,
                      clip_high: float = 0.2, dual_clip: float | None = None, kl_coef: float = 0.0,
                      kl_type: str = "k3", entropy_coef: float = 0.0, loss_agg: str = "token-mean",
                      normalizer=None, is_weights: Tensor | None = None, loss_scale_factor: float | None = None,
                      logit_softcap: float | None = None, logit_scale: float | None = None,
                      memory: str = "speed", backend: str | None = None):
    """``policy_loss(linear_logprobs(hidden, weight, targets, ...), ...)`` fused: no [N, V] tensor,
    masked tokens cost no GEMM work. Returns (loss, metrics). The keywords are those of the two
    ops (``old_logprobs=None`` is on-policy, the log-probs then never leave the kernel)."""
    hidden, weight, bias = _ops.autocast_operands(hidden, weight, bias)
    _check_hidden_weight(hidden, weight, bias)
    lead, dev = hidden.shape[:-1], hidden.device
    m = C.mask("mask", mask, lead, "hidden without its last dim", dev)
    tgt = C.targets("targets", targets, lead, "hidden without its last dim", weight.shape[0], dev, valid=m)
    temperature = C.finite("temperature", temperature, lo=0.0, lo_open=True)
    C.choice("memory", memory, C.MEMORY_MODES)
    params = _loss_params(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, loss_agg)
    softcap, scale = _logit_transform(logit_softcap, logit_scale)
    old = None if old_logprobs is None else _per_token("old_logprobs", old_logprobs, lead, "targets", dev)
    adv = _row_broadcast("advantages", advantages, lead, "targets", dev)
    ref = None if ref_logprobs is None else _per_token("ref_logprobs", ref_logprobs, lead, "targets", dev)
    sd = C.stat_dtype(hidden)
    w = _token_weights(m, loss_agg, normalizer, loss_scale_factor, is_weights, lead, "targets", sd, dev)
    name = _backends.resolve("fused_policy_loss", backend, dev)
    need = _need((hidden, _ops.NEED_H), (weight, _ops.NEED_W), (bias, _ops.NEED_B))
    loss, stats, *_ = _ops.fused_policy_loss(hidden.reshape(-1, hidden.shape[-1]), weight, tgt.reshape(-1),
                                             old, adv, w, m.reshape(-1), ref, bias, *params, temperature,
                                             memory, name, need, softcap, scale)
    return loss, _metrics(stats, m, kl=ref is not None, entropy=params[5] != 0.0, dual=dual_clip is not None)


def value_head(hidden: Tensor, weight: Tensor, bias=None, *, backend: str | None = None) -> Tensor:
    """``hidden @ weight + bias`` with weight [H] or [1, H]; fp32 values of shape hidden.shape[:-1]."""
    w, b = _value_weights(hidden, weight, bias, "hidden", "weight", "bias")
    name = _backends.resolve("value_head", backend, hidden.device)
    return _ops.value_head(hidden.reshape(-1, hidden.shape[-1]), w, b, name).view(hidden.shape[:-1])


def _value_weights(hidden, weight, bias, hname, wname, bname):
    C.tensor(hname, hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{hname} must have a hidden dim")
    C.tensor(wname, weight, ndim=(1, 2))
    hdim = hidden.shape[-1]
    if weight.numel() != hdim or (weight.dim() == 2 and weight.shape[0] != 1):
        raise ValueError(f"{wname} must have shape [{hdim}] or [1, {hdim}], got {tuple(weight.shape)}")
    C.same_device(wname, weight, hidden.device)
    if bias is None:
        return weight.reshape(hdim), None
    if isinstance(bias, Tensor):
        C.tensor(bname, bias)
        if bias.numel() != 1:
            raise ValueError(f"{bname} must hold one value, got shape {tuple(bias.shape)}")
        C.same_device(bname, bias, hidden.device)
        return weight.reshape(hdim), bias.reshape(())
    b = C.finite(bname, bias)
    return weight.reshape(hdim), torch.tensor(b, dtype=C.stat_dtype(hidden), device=hidden.device)


def _gamma_lam(gamma, lam):
    return C.finite("gamma", gamma, lo=0.0, hi=1.0), C.finite("lam", lam, lo=0.0, hi=1.0)


def gae(values: Tensor, rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95,
        backend: str | None = None):
    """Masked generalised advantage estimation over [B, T]; returns (advantages, returns)."""
    C.tensor("values", values, ndim=2)
    shape, dev = values.shape, values.device
    C.tensor("rewards", rewards)
    C.same_shape("rewards", rewards, shape, "values")
    C.same_device("rewards", rewards, dev)
    m = C.mask("mask", mask, shape, "values", dev)
    gamma, lam = _gamma_lam(gamma, lam)
    sd = C.stat_dtype(values, rewards)
    name = _backends.resolve("gae", backend, dev)
    return _ops.gae(values.detach().to(sd).contiguous(), rewards.detach().to(sd).contiguous(), m.contiguous(),
                    gamma, lam, name)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  backend: str | None = None) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the valid entries (unbiased var); masked entries 0."""
    C.tensor("x", x)
    m = C.mask("mask", mask, x.shape, "x", x.device)
    eps = C.finite("eps", eps, lo=0.0)
    name = _backends.resolve("masked_whiten", backend, x.device)
    sd = C.stat_dtype(x)
    return _ops.masked_whiten(x.detach().to(sd).contiguous(), m.contiguous(), bool(shift_mean), eps, name)


def dvpo_advantages(gvm_hidden: Tensor, value_weight: Tensor, value_bias, mask: Tensor, *,
                    old_logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None,
                    kl_coef: float = 0.0, score: Tensor | None = None, gamma: float = 1.0,
                    lam: float = 0.95, value_norm: str = "seq", whiten_advantages: bool = True,
                    backend: str | None = None):
    """Frozen-GVM advantages (DESIGN.md §3.7): values from the value head, normalised per
    ``value_norm``, KL (+ score) rewards, masked GAE, whitened advantages.
    Returns (advantages, returns, values), each [B, T]."""
    C.tensor("gvm_hidden", gvm_hidden, ndim=3)
    b, t, _ = gvm_hidden.shape
    dev = gvm_hidden.device
    w, bias = _value_weights(gvm_hidden, value_weight, value_bias, "gvm_hidden", "value_weight", "value_bias")
    m = C.mask("mask", mask, (b, t), "gvm_hidden without its last dim", dev)
    old = C.optional("old_logprobs", old_logprobs, (b, t), "mask", dev)
    ref = C.optional("ref_logprobs", ref_logprobs, (b, t), "mask", dev)
    kl_coef = C.finite("kl_coef", kl_coef)
    if (ref is None) != (old is None) and ref is not None:
        raise ValueError("old_logprobs is required when ref_logprobs is given")
    if kl_coef != 0.0 and ref is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (and old_logprobs)")
    if score is not None:
        C.tensor("score", score)
        C.same_shape("score", score, (b,), "the batch dim of gvm_hidden")
        C.same_device("score", score, dev)
    gamma, lam = _gamma_lam(gamma, lam)
    C.choice("value_norm", value_norm, C.VALUE_NORMS)
    name = _backends.resolve("dvpo_advantages", backend, dev)
    return _ops.dvpo_advantages(gvm_hidden.detach(), w.detach(), None if bias is None else bias.detach(),
                                m.contiguous(), None if old is None else old.detach(),
                                None if ref is None else ref.detach(), kl_coef,
                                None if score is None else score.detach(), gamma, lam, value_norm,
                                bool(whiten_advantages), name)


_ADV_KEYS = ("score", "gamma", "lam", "value_norm", "whiten_advantages")


def dvpo_loss(policy_hidden: Tensor, lm_head_weight: Tensor, targets: Tensor, old_logprobs: Tensor | None,
              mask: Tensor, gvm_hidden: Tensor, value_weight: Tensor, value_bias, *,
              ref_logprobs: Tensor | None = None, kl_coef: float = 0.0, kl_in: str = "reward",
              backend: str | None = None, **kw):
    """``dvpo_advantages`` then ``fused_policy_loss``, for one-epoch on-policy updates.

    ``kl_in="reward"`` (the DVPO recipe) puts ``-kl_coef*(old-ref)`` into the per-token reward;
    ``kl_in="loss"`` adds ``kl_coef * kl_type(ref, logp)`` to the loss instead. Keywords of
    ``dvpo_advantages`` (score, gamma, lam, value_norm, whiten_advantages) go there, the rest
    to ``fused_policy_loss``. Returns (loss, metrics) with the advantage statistics added.
    ``old_logprobs=None`` is on-policy; a KL reward then needs the current log-probs first (one
    more forward pass of the LM head, without gradient).
    """
    C.choice("kl_in", kl_in, ("reward", "loss"))
    adv_kw = {k: kw.pop(k) for k in _ADV_KEYS if k in kw}
    in_reward = kl_in == "reward"
    reward_old = old_logprobs
    if in_reward and ref_logprobs is not None and old_logprobs is None:
        with torch.no_grad():
            head_kw = {k: kw[k] for k in ("bias", "temperature", "memory", "logit_softcap", "logit_scale") if k in kw}
            valid = C.mask("mask", mask, targets.shape, "targets", targets.device)
            reward_old = linear_logprobs(policy_hidden, lm_head_weight, torch.where(valid, targets, 0),
                                         backend=backend, **head_kw)
    adv, _, values = dvpo_advantages(gvm_hidden, value_weight, value_bias, mask,
                                     old_logprobs=reward_old if in_reward and ref_logprobs is not None else None,
                                     ref_logprobs=ref_logprobs if in_reward else None,
                                     kl_coef=kl_coef if in_reward else 0.0, backend=backend, **adv_kw)
    loss, metrics = fused_policy_loss(policy_hidden, lm_head_weight, targets, old_logprobs, adv, mask,
                                      ref_logprobs=None if in_reward else ref_logprobs,
                                      kl_coef=0.0 if in_reward else kl_coef, backend=backend, **kw)
    m = mask.bool() if mask.dtype != torch.bool else mask
    count = m.sum().clamp(min=1)
    metrics["advantages_mean"] = (torch.where(m, adv, 0.0).sum() / count).float()
    metrics["values_mean"] = (torch.where(m, values, 0.0).sum() / count).float()
    return loss, metrics
