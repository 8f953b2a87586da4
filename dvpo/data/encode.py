"""Tokenising prompt/response examples with truncation that keeps the end of the response.

A response is its text's tokens followed by EOS. When prompt + response exceed ``max_length``,
the prompt loses tokens from the left first (a leading BOS is kept), down to one token, and only
then the response loses tokens from the left, so the response's end and its EOS, where the
reward sits, always survive.
"""
from __future__ import annotations

from dataclasses import dataclass

from .records import Prompt
from .stats import DataStats
from .templates import prompt_has_special_tokens, render_prompt, render_response, resolve_template


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
             bos_token_id: int | None = None) -> tuple[list[int], list[int], bool, bool]:
    """-> (prompt, response, prompt_truncated, response_truncated); see the module docstring."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    keep_bos = bos_token_id is not None and bool(prompt_ids) and prompt_ids[0] == bos_token_id
    p, r = prompt_ids, response_ids
    if max_prompt_length is not None and len(p) > max_prompt_length:
        p = _keep_last(p, max(1, max_prompt_length), keep_bos)
    over = len(p) + len(r) - max_length
    if over > 0:
        p = _keep_last(p, max(1, len(p) - over), keep_bos)
        over = len(p) + len(r) - max_length
    if over > 0:
        r = r[over:]
    return p, r, len(p) < len(prompt_ids), len(r) < len(response_ids)


class Encoder:
    """Renders (template) and tokenises examples, truncates them, and counts what it changed.

    ``template`` is ``auto``, ``chat`` or ``plain`` (see :mod:`dvpo.data.templates`)."""

    def __init__(self, tokenizer, *, template: str = "auto", max_length: int = 1024,
                 max_prompt_length: int | None = None, stats: DataStats | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; responses must end with one")
        self.tokenizer = tokenizer
        self.template = resolve_template(template, tokenizer)
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
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
            p, r, p_cut, r_cut = truncate(prompt_ids, self.response_ids(prompt, response), self.max_length,
                                          self.max_prompt_length, self.tokenizer.bos_token_id)
            if p_cut:
                self.stats.note("sequences with the prompt truncated")
            if r_cut:
                self.stats.note("sequences with the response truncated")
            out.append(EncodedSequence(p, r))
        if len(out) == 2 and out[0] == out[1]:
            self.stats.skip("responses identical after truncation", where)
            return None
        return out
