"""Padding-free forwards: the valid tokens of a padded ``[B, L]`` batch run as packed rows.

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
    input_ids: Tensor  # [R, W]
    position_ids: Tensor  # [R, W]
    source: Tensor  # [nnz] flat indices of the packed tokens in the [B, L] batch
    target: Tensor  # [nnz] their flat indices in the [R, W] packed rows
    shape: tuple[int, int]  # (B, L)
    empty: bool  # no valid token: one padding token runs so that sharded forwards stay collective


def sequence_positions(attention_mask: Tensor) -> Tensor:
    """``[B, L]`` positions counted over each row's valid tokens (0 at its first one)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Sequences (by index) into rows of at most ``width`` tokens, longest first, each into the first row
    with room: few rows, little padding."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] == 0:
            continue
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def pack(input_ids: Tensor, attention_mask: Tensor, width: int | None = None) -> Packed:
    """The valid tokens of ``input_ids`` packed into rows of at most ``width`` tokens (None: one row of
    all of them), each sequence whole in one row with its own positions. Row ends are filled with
    padding that counts 0, 1, ... as a sequence of its own, so it touches no real token."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L] like input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    b, length = input_ids.shape
    device = input_ids.device
    counts = attention_mask.bool().sum(-1).tolist()
    nnz = sum(counts)
    if nnz == 0:
        zero = torch.zeros(1, dtype=torch.long, device=device)
        return Packed(input_ids.reshape(-1)[:1][None], zero[None], zero, zero, (b, length), True)
    width = nnz if width is None else max(width, max(counts))
    rows = first_fit(counts, width)
    used = [sum(counts[i] for i in row) for row in rows]
    row_width = max(used)
    # each sequence's valid tokens (flat [B*L] indices, in order) and where they land in the packed rows
    valid = attention_mask.reshape(-1).bool().nonzero().squeeze(1)
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    order = [i for row in rows for i in row]
    source = torch.cat([valid[starts[i]:starts[i + 1]] for i in order])
    offsets = torch.tensor([r * row_width for r, row in enumerate(rows) for _ in row], device=device)
    within = torch.tensor([sum(counts[j] for j in row[:k]) for row in rows for k in range(len(row))], device=device)
    lengths = torch.tensor([counts[i] for i in order], device=device)
    first = torch.repeat_interleave(offsets + within, lengths)
    step = torch.arange(nnz, device=device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    target = first + step
    filler = torch.arange(row_width, device=device).expand(len(rows), -1) - \
        torch.tensor(used, device=device)[:, None]  # the row-end padding counts from 0
    positions = filler.clamp_min(0).reshape(-1).index_put((target,), step)
    ids = input_ids.new_full((len(rows) * row_width,), 0).index_put((target,), input_ids.reshape(-1)[source])
    return Packed(ids.view(len(rows), row_width), positions.view(len(rows), row_width), source, target,
                  (b, length), False)


def unpack(values: Tensor, packed: Packed) -> Tensor:
    """``[R, W, ...]`` -> ``[B, L, ...]``, zeros at the padding."""
    flat = values.reshape(-1, *values.shape[2:])
    if packed.empty:
        flat = flat[:1] * 0  # keeps the graph (a backward still reaches every sharded parameter)
        source = packed.source
    else:
        flat, source = flat.index_select(0, packed.target), packed.source
    b, length = packed.shape
    out = flat.new_zeros((b * length, *flat.shape[1:]))
    return out.index_copy(0, source, flat).view(b, length, *flat.shape[1:])


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
    """``backbone``'s final hidden states ``[B, L, H]`` from a packed forward (zeros at the padding). Under
    flash-attn one row of every valid token (varlen attention skips the other sequences); under
    sdpa/eager, whose packed attention is a dense block-diagonal mask over its row, rows no wider than
    the longest sequence, so attention costs no more than the padded batch's."""
    flash = backbone.config._attn_implementation.startswith("flash_attention")
    packed = pack(input_ids, attention_mask, None if flash else attention_mask.shape[1])
    hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None,
                      use_cache=False).last_hidden_state
    return unpack(hidden, packed)
