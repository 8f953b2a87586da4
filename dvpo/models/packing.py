"""Padding-free forwards: the valid tokens of a padded ``[B, L]`` batch run as one ``[1, nnz]`` row.

Each sequence keeps its own positions (0, 1, 2, ... over its valid tokens) and attends only to itself:
transformers reads the sequence boundaries from ``position_ids`` when no attention mask is given (a
position that does not follow its predecessor by one starts a new sequence) and builds the
block-diagonal causal mask for ``sdpa``/``eager`` (``masking_utils.find_packed_sequence_indices``,
4.56 and later) or the varlen ``cu_seqlens`` for ``flash_attention_*``. The final hidden states are
scattered back to ``[B, L, H]`` with zeros at the padding, so heads and losses see the padded layout
and padding gets no gradient.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

PACKING_MODES = ("auto", "on", "off")
_ATTENTION = ("sdpa", "eager")


@dataclass
class Packed:
    input_ids: Tensor  # [1, nnz]
    position_ids: Tensor  # [1, nnz]
    rows: Tensor  # [nnz] flat indices of the packed tokens in the [B, L] batch
    shape: tuple[int, int]  # (B, L)
    empty: bool  # no valid token: one padding token runs so that sharded forwards stay collective


def sequence_positions(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` positions counted over each row's valid tokens (0 at its first one)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def pack(input_ids: Tensor, attention_mask: Tensor) -> Packed:
    """The valid tokens of ``input_ids`` as one row, with per-sequence positions."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L] like input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    valid = attention_mask.reshape(-1).bool()
    rows = valid.nonzero().squeeze(1)
    empty = rows.numel() == 0
    if empty:
        rows = torch.zeros(1, dtype=torch.long, device=input_ids.device)
    positions = sequence_positions(attention_mask).reshape(-1).index_select(0, rows)
    return Packed(input_ids.reshape(-1).index_select(0, rows)[None], positions[None], rows,
                  tuple(input_ids.shape), empty)


def unpack(values: Tensor, packed: Packed) -> Tensor:
    """``[1, nnz, ...]`` -> ``[B, L, ...]``, zeros at the padding."""
    flat = values[0]
    if packed.empty:
        flat = flat * 0  # keeps the graph (a backward still reaches every sharded parameter)
    b, length = packed.shape
    out = flat.new_zeros((b * length, *flat.shape[1:]))
    return out.index_copy(0, packed.rows, flat).view(b, length, *flat.shape[1:])


def supports_packing(hf_model: nn.Module) -> bool:
    """The model's attention can restrict a packed row to its sequences: ``flash_attention_*`` (varlen),
    or ``sdpa``/``eager`` in a modeling file that builds its masks with transformers' ``masking_utils``
    (Llama, Qwen2/3, Mistral, Gemma, ...: what reads packed ``position_ids``)."""
    impl = getattr(hf_model.config, "_attn_implementation", None) or "eager"
    if impl.startswith("flash_attention"):
        return True
    if impl not in _ATTENTION:
        return False
    backbone = getattr(hf_model, hf_model.base_model_prefix, hf_model)
    return hasattr(sys.modules.get(type(backbone).__module__), "create_causal_mask")


def matches_sequence_positions(position_ids: Tensor | None, attention_mask: Tensor) -> bool:
    """The positions the padded forward would use (``position_ids``, default ``0 .. L-1``) equal the
    per-sequence ones at every valid token, so packing computes the same numbers."""
    if position_ids is None:
        position_ids = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None]
    valid = attention_mask.bool()
    return torch.equal(position_ids.expand_as(attention_mask)[valid], sequence_positions(attention_mask)[valid])


_mode = "auto"


def set_packing(mode: str) -> None:
    """The process-wide ``train.packing``: ``auto`` packs every forward the model supports and that has
    padding, ``on`` packs every forward (an error where it cannot), ``off`` never packs."""
    global _mode
    if mode not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}, got {mode!r}")
    _mode = mode


def packing_mode() -> str:
    return _mode


def should_pack(hf_model: nn.Module, attention_mask: Tensor | None, position_ids: Tensor | None) -> bool:
    """Whether a forward of ``hf_model`` on this batch runs packed under the current mode."""
    if _mode == "off" or attention_mask is None:
        return False
    if not supports_packing(hf_model):
        if _mode == "on":
            raise ValueError(f"packing=on: {type(hf_model).__name__} with attention "
                             f"{hf_model.config._attn_implementation!r} cannot run packed sequences")
        return False
    if not matches_sequence_positions(position_ids, attention_mask):
        if _mode == "on":
            raise ValueError("packing=on: position_ids must count 0, 1, 2, ... over each row's valid tokens "
                             "(left-padded rows need them from the attention mask)")
        return False
    return _mode == "on" or not bool(attention_mask.bool().all())


def packed_backbone(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``backbone``'s final hidden states ``[B, L, H]`` from one packed forward (zeros at the padding)."""
    packed = pack(input_ids, attention_mask)
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                      use_cache=False).last_hidden_state
    return unpack(hidden, packed)
