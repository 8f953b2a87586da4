"""torch.library custom ops: the autograd and torch.compile layer over the backends.

Each op takes already-validated, flattened tensors plus the resolved backend name, so
``torch.compile(fullgraph=True)`` sees one opaque node per op (fake kernels give shapes; every
output is contiguous). Gradient flags are an int bitmask: 1 = hidden, 2 = weight, 4 = bias.

Autocast: the functional layer casts the LM-head GEMM operands as ``F.linear`` would
(``autocast_operands``); op bodies then run with autocast off, so the backends compute in the
dtypes they are given and statistics stay fp32.

CUDA graphs: ops that sync the host (the masked-token compaction of ``fused_policy_loss``)
carry ``torch.Tag.cudagraph_unsafe``, so ``torch.compile(mode="reduce-overhead")`` leaves
them out of captured graphs. Backend probes run when an op is resolved, outside the ops.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch.library import custom_op, register_fake

from . import _backends
from ._params import STAT_NAMES, LossParams

NEED_H, NEED_W, NEED_B = 1, 2, 4
_EMPTY = (0,)
# Older PyTorch has no such tag; there the host-syncing op is simply not capture-safe.
_HOST_SYNC = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


def autocast_operands(*tensors):
    """``tensors`` as ``F.linear`` sees them under ``torch.autocast`` on their device: floating
    tensors other than fp64 cast to the autocast dtype; unchanged outside autocast."""
    first = tensors[0]
    dev = first.device.type if isinstance(first, Tensor) else None
    if dev is None or not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _no_autocast(t: Tensor):
    """Op bodies compute in their inputs' dtypes: autocast, if on, was applied by the caller."""
    dev = t.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _sd(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _flags(need: int):
    return bool(need & NEED_H), bool(need & NEED_W), bool(need & NEED_B)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A backend's output as the op returns it: contiguous, or an empty tensor for None."""
    return t.contiguous() if t is not None else like.new_empty(_EMPTY)


def _fake_grads(hidden, weight, bias, need):
    dh, dw, db = _flags(need)
    return (hidden.new_empty(hidden.shape if dh else _EMPTY),
            weight.new_empty(weight.shape if dw else _EMPTY),
            bias.new_empty(bias.shape) if (db and bias is not None) else weight.new_empty(_EMPTY))


# --- linear_logprobs -------------------------------------------------------------------------

@custom_op("dvpo::linear_logprobs", mutates_args=())
def linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                    temperature: float, return_entropy: bool, memory: str,
                    backend: str, softcap: float = 0.0, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(hidden):
        fn = _backends.impl(backend, "linear_logprobs")
        return fn(hidden, weight, targets, bias, temperature, return_entropy, memory, softcap, scale)


@register_fake("dvpo::linear_logprobs")
def _(hidden, weight, targets, bias, temperature, return_entropy, memory, backend, softcap=0.0, scale=1.0):
    n = hidden.shape[0]
    sd = _sd(hidden)
    return (hidden.new_empty(n, dtype=sd), hidden.new_empty(n if return_entropy else 0, dtype=sd),
            hidden.new_empty(n, dtype=sd))


@custom_op("dvpo::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(grad_logp: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor,
                             weight: Tensor, targets: Tensor, bias: Optional[Tensor], lse: Tensor,
                             entropy: Tensor, temperature: float, memory: str, backend: str,
                             need: int, softcap: float = 0.0, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(hidden):
        fn = _backends.impl(backend, "linear_logprobs_backward")
        dh, dw, db = fn(grad_logp, grad_entropy, hidden, weight, targets, bias, temperature, lse, entropy,
                        memory, _flags(need), softcap, scale)
    return _or_empty(dh, hidden), _or_empty(dw, weight), _or_empty(db, weight)


@register_fake("dvpo::linear_logprobs_backward")
def _(grad_logp, grad_entropy, hidden, weight, targets, bias, lse, entropy, temperature, memory,
      backend, need, softcap=0.0, scale=1.0):
    return _fake_grads(hidden, weight, bias, need)


def _ll_setup(ctx, inputs, output):
    hidden, weight, targets, bias, temperature, return_entropy, memory, backend, softcap, scale = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, ent)
    ctx.cfg = (temperature, return_entropy, memory, backend, softcap, scale)


def _ll_backward(ctx, g_logp, g_ent, _g_lse):
    hidden, weight, targets, bias, lse, ent = ctx.saved_tensors
    temperature, return_entropy, memory, backend, softcap, scale = ctx.cfg
    need = (NEED_H * ctx.needs_input_grad[0] + NEED_W * ctx.needs_input_grad[1]
            + NEED_B * (bias is not None and ctx.needs_input_grad[3]))
    dh, dw, db = torch.ops.dvpo.linear_logprobs_backward(
        g_logp, g_ent if return_entropy else None, hidden, weight, targets, bias, lse, ent,
        temperature, memory, backend, need, softcap, scale)
    dh, dw, db = (t if need & f else None for t, f in ((dh, NEED_H), (dw, NEED_W), (db, NEED_B)))
    return dh, dw, None, db, None, None, None, None, None, None


linear_logprobs.register_autograd(_ll_backward, setup_context=_ll_setup)


# --- policy losses ---------------------------------------------------------------------------

@custom_op("dvpo::policy_loss", mutates_args=())
def policy_loss(logp: Tensor, entropy: Optional[Tensor], old: Tensor, adv: Tensor, tok_weight: Tensor,
                mask: Tensor, ref: Optional[Tensor], clip_low: float, clip_high: float, dual_clip: float,
                kl_coef: float, kl_type: str, entropy_coef: float,
                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    sd = _sd(logp)
    cast = (lambda t: None if t is None else t.to(sd))
    p = LossParams(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef)
    with _no_autocast(logp):
        loss, stats, g_logp, g_ent = _backends.impl(backend, "policy_loss")(
            cast(logp), cast(entropy), cast(old), cast(adv), cast(tok_weight), mask, cast(ref), p)
    return loss, stats, g_logp.contiguous(), _or_empty(g_ent, g_logp)


@register_fake("dvpo::policy_loss")
def _(logp, entropy, old, adv, tok_weight, mask, ref, clip_low, clip_high, dual_clip, kl_coef,
      kl_type, entropy_coef, backend):
    sd = _sd(logp)
    n = logp.shape[0]
    return (logp.new_empty((), dtype=sd), logp.new_empty(len(STAT_NAMES), dtype=sd),
            logp.new_empty(n, dtype=sd), logp.new_empty(n if entropy is not None else 0, dtype=sd))


def _pl_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3])
    ctx.dtypes = (inputs[0].dtype, None if inputs[1] is None else inputs[1].dtype)


def _pl_backward(ctx, g_loss, _g_stats, _g1, _g2):
    g_logp, g_ent = ctx.saved_tensors
    d_logp = (g_loss * g_logp).to(ctx.dtypes[0])
    d_ent = None if ctx.dtypes[1] is None else (g_loss * g_ent).to(ctx.dtypes[1])
    return (d_logp, d_ent) + (None,) * 12


policy_loss.register_autograd(_pl_backward, setup_context=_pl_setup)


@custom_op("dvpo::fused_policy_loss", mutates_args=(), **_HOST_SYNC)
def fused_policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old: Optional[Tensor], adv: Tensor,
                      tok_weight: Tensor, mask: Tensor, ref: Optional[Tensor], bias: Optional[Tensor],
                      clip_low: float, clip_high: float, dual_clip: float, kl_coef: float, kl_type: str,
                      entropy_coef: float, temperature: float, memory: str, backend: str,
                      need: int, softcap: float = 0.0,
                      scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    p = LossParams(clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef)
    with _no_autocast(hidden):
        loss, stats, dh, dw, db = _backends.impl(backend, "fused_policy_loss")(
            hidden, weight, targets, old, adv, tok_weight, mask, ref, bias, p, temperature, memory,
            _flags(need), softcap, scale)
    return loss, stats, _or_empty(dh, hidden), _or_empty(dw, weight), _or_empty(db, weight)


@register_fake("dvpo::fused_policy_loss")
def _(hidden, weight, targets, old, adv, tok_weight, mask, ref, bias, clip_low, clip_high, dual_clip,
      kl_coef, kl_type, entropy_coef, temperature, memory, backend, need, softcap=0.0, scale=1.0):
    sd = _sd(hidden)
    return (hidden.new_empty((), dtype=sd), hidden.new_empty(len(STAT_NAMES), dtype=sd),
            *_fake_grads(hidden, weight, bias, need))


def _fpl_setup(ctx, inputs, output):
    ctx.need = inputs[18]
    ctx.save_for_backward(*output[2:])


def _fpl_backward(ctx, g_loss, _g_stats, _g_dh, _g_dw, _g_db):
    dh, dw, db = ctx.saved_tensors
    # Out of place, so retain_graph / gradcheck can run backward more than once.
    scale = (lambda t, f: (t * g_loss).to(t.dtype) if ctx.need & f else None)
    return (scale(dh, NEED_H), scale(dw, NEED_W)) + (None,) * 6 + (scale(db, NEED_B),) + (None,) * 12


fused_policy_loss.register_autograd(_fpl_backward, setup_context=_fpl_setup)


# --- value head and advantages ---------------------------------------------------------------

@custom_op("dvpo::value_head", mutates_args=())
def value_head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    with _no_autocast(hidden):
        return _backends.impl(backend, "value_head")(hidden, weight, bias).contiguous()


@register_fake("dvpo::value_head")
def _(hidden, weight, bias, backend):
    return hidden.new_empty(hidden.shape[0], dtype=_sd(hidden))


def _vh_setup(ctx, inputs, output):
    hidden, weight, bias, _ = inputs
    ctx.save_for_backward(hidden, weight, bias)


def _vh_backward(ctx, g):
    hidden, weight, bias = ctx.saved_tensors
    dh = (g[:, None] * weight.to(g.dtype)).to(hidden.dtype) if ctx.needs_input_grad[0] else None
    with _no_autocast(g):
        dw = (g @ hidden.to(g.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = g.sum().reshape(bias.shape).to(bias.dtype) if (bias is not None and ctx.needs_input_grad[2]) else None
    return dh, dw, db, None


value_head.register_autograd(_vh_backward, setup_context=_vh_setup)


@custom_op("dvpo::gae", mutates_args=())
def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float,
        backend: str) -> tuple[Tensor, Tensor]:
    with _no_autocast(values):
        adv, ret = _backends.impl(backend, "gae")(values, rewards, mask, gamma, lam)
    return adv.contiguous(), ret.contiguous()


@register_fake("dvpo::gae")
def _(values, rewards, mask, gamma, lam, backend):
    return values.new_empty(values.shape), values.new_empty(values.shape)


@custom_op("dvpo::masked_whiten", mutates_args=())
def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool, eps: float, backend: str) -> Tensor:
    with _no_autocast(x):
        return _backends.impl(backend, "masked_whiten")(x, mask, shift_mean, eps).contiguous()


@register_fake("dvpo::masked_whiten")
def _(x, mask, shift_mean, eps, backend):
    return x.new_empty(x.shape)


@custom_op("dvpo::dvpo_advantages", mutates_args=())
def dvpo_advantages(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor,
                    old: Optional[Tensor], ref: Optional[Tensor], kl_coef: float, score: Optional[Tensor],
                    gamma: float, lam: float, value_norm: str, whiten_advantages: bool,
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(hidden):
        out = _backends.impl(backend, "dvpo_advantages")(hidden, weight, bias, mask, old, ref, kl_coef, score,
                                                          gamma, lam, value_norm, whiten_advantages)
    return tuple(t.contiguous() for t in out)


@register_fake("dvpo::dvpo_advantages")
def _(hidden, weight, bias, mask, old, ref, kl_coef, score, gamma, lam, value_norm, whiten_advantages, backend):
    sd = _sd(hidden)
    return tuple(hidden.new_empty(mask.shape, dtype=sd) for _ in range(3))
