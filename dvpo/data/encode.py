"""Tokenising prompt/response examples; an example too long for ``max_length`` is dropped or loses
the left side of its prompt, never part of its response.

A response is its text's tokens followed by EOS. Cutting into a response would train on text without
the context it answers (and the official DVPO code drops such examples), so ``truncation="drop"`` (the
default) drops every example longer than ``max_length`` and ``"prompt_left"`` cuts its prompt from the
left (a leading BOS is kept) down to one token, dropping only examples whose response still does not fit.
``max_prompt_length`` caps the prompt (from the left) first, in both modes.
"""
from __future__ import annotations

from dataclasses import dataclass

from .records import Prompt
from .stats import DataStats
from .templates import prompt_has_special_tokens, render_prompt, render_response, resolve_template

TRUNCATION_MODES = ("drop", "prompt_left")
TOO_LONG = "longer than data.max_length"


@dataclass(frozen=True)
class EncodedSequence:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _keep_last(ids: list[int], n: int, keep_first: bool) -> list[int]:
    """The last ``n`` tokens of ``ids``, or its first token plus the last ``n - 1``."""
    if len(ids) <= n:
        return ids
    if keep_first:
        return ids[:1] + (ids[len(ids) - (n - 1):] if n > 1 else [])
    return ids[len(ids) - n:]


def truncate(prompt_ids: list[int], response_ids: list[int], max_length: int, max_prompt_length: int | None = None,
             bos_token_id: int | None = None, mode: str = "prompt_left") -> tuple[list[int], bool] | None:
    """-> (prompt, prompt_truncated), or None when the example must be dropped; see the module docstring.
    A prompt that keeps its BOS keeps at least one token after it."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(TRUNCATION_MODES)}, got {mode!r}")
    keep_bos = bos_token_id is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos_token_id
    shortest = 2 if keep_bos else 1
    p = prompt_ids
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p = _keep_last(p, max(shortest, max_prompt_length), keep_bos)
    over = len(p) + len(response_ids) - max_length
    if over > 0:
        if mode == "drop" or len(p) - over < min(shortest, len(p)):
            return None
        p = _keep_last(p, len(p) - over, keep_bos)
    return p, len(p) < len(prompt_ids)


class Encoder:
    """Renders (template) and tokenises examples, truncates them, and counts what it changed.

    ``template`` is ``auto``, ``chat`` or ``plain`` (see :mod:`dvpo.data.templates`)."""

    def __init__(self, tokenizer, *, template: str = "auto", max_length: int = 1024,
                 max_prompt_length: int | None = None, truncation: str = "drop", stats: DataStats | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses must end with one")
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer)
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got {truncation!r}")
        self.max_length, self.max_prompt_length, self.truncation = max_length, max_prompt_length, truncation
        self.stats = stats if stats is not None else DataStats("encoded examples")

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        text = render_prompt(prompt, self.tokenizer, self.template)
        return self.tokenizer.encode(text, add_special_tokens=not prompt_has_special_tokens(prompt, self.template))

    def response_ids(self, prompt: Prompt, response: str) -> list[int]:
        ids = self.tokenizer.encode(render_response(prompt, response, self.template), add_special_tokens=False)
        eos = self.tokenizer.eos_token_id
        return ids if ids and ids[-1] == eos else ids + [eos]

    def encode(self, prompt: Prompt, responses: list[str], where: str) -> list[EncodedSequence] | None:
        """The prompt with each of its responses; None (counted as skipped) when unusable."""
        prompt_ids = self.prompt_ids(prompt)
        if not prompt_ids:
            self.stats.skip("prompt encodes to no tokens", where)
            return None
        out = []
        for response in responses:
            response_ids = self.response_ids(prompt, response)
            fitted = truncate(prompt_ids, response_ids, self.max_length, self.max_prompt_length,
                              self.tokenizer.bos_token_id, self.truncation)
            if fitted is None:
                self.stats.skip(f"{TOO_LONG} (data.truncation={self.truncation})", where)
                return None
            p, p_cut = fitted
            if p_cut:
                self.stats.note("sequences with the prompt truncated")
            out.append(EncodedSequence(p, response_ids))
        if len(out) == 2 and out[0] == out[1]:
            self.stats.skip("responses encode identically", where)
            return None
        return out
