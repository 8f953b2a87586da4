"""Readers for the JSONL record formats: preference pairs, prompts, scalar-scored responses.

A prompt is either raw text (a string; responses are appended to it verbatim) or a conversation,
a list of ``{"role", "content"}`` messages that a template renders (the tokenizer's chat template,
or the plain Anthropic-HH style ``\\n\\nHuman: ...\\n\\nAssistant:``); a response to a conversation is
the assistant's content.

Preference formats, detected per record:

* ``{"prompt": str | messages, "chosen": str | [assistant message], "rejected": ...}``
* ``{"chosen": messages, "rejected": messages}``: the prompt is the shared leading messages, the
  responses the final assistant messages.
* Anthropic HH, ``{"chosen": str, "rejected": str}`` whole dialogues: the prompt is the shared prefix
  up to its last ``"\\n\\nAssistant:"``, parsed into a conversation.

Malformed records raise :class:`DataError` with ``file:line``; pairs that cannot train (identical
responses, an empty response) are skipped and counted in :class:`DataStats`.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .jsonl import DataError, iter_jsonl
from .stats import DataStats

Message = dict[str, str]
Prompt = str | list[Message]

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferencePair:
    prompt: Prompt
    chosen: str
    rejected: str
    where: str  # file:line


@dataclass(frozen=True)
class ScoredResponse:
    prompt: Prompt
    response: str
    reward: float
    where: str


@dataclass(frozen=True)
class Demonstration:
    prompt: Prompt
    response: str
    where: str


@dataclass(frozen=True)
class PromptRecord:
    prompt: Prompt
    where: str


# --- field parsing ---------------------------------------------------------------------------

def _messages(value, where: str, key: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(where, f"{key!r} must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str) and isinstance(msg.get("content"), str)):
            raise DataError(where, f"{key}[{i}] must be an object with string 'role' and 'content'")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _prompt(value, where: str, key: str = "prompt") -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, where, key)
    raise DataError(where, f"{key!r} must be a string or a list of messages, got {type(value).__name__}")


def _response(value, where: str, key: str) -> str:
    """A response: a string, or a list holding exactly one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _messages(value, where, key)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(where, f"{key!r} must hold exactly one assistant message when 'prompt' is given")
        return msgs[0]["content"]
    raise DataError(where, f"{key!r} must be a string or a list of messages, got {type(value).__name__}")


def _require(record: dict, where: str, *keys: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(where, f"missing field(s) {', '.join(map(repr, missing))} (has {', '.join(map(repr, record))})")


def parse_hh_dialogue(text: str) -> list[Message]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> messages; text before the first turn becomes a system
    message; one space after each ``Role:`` belongs to the format, not to the content."""
    parts = _HH_TURN.split(text)
    messages = [{"role": "system", "content": parts[0]}] if parts[0] else []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": _HH_ROLES[role], "content": content.removeprefix(" ")})
    return messages


def split_hh(chosen: str, rejected: str, where: str) -> tuple[list[Message], str, str]:
    """Anthropic HH pair -> (prompt conversation, chosen response, rejected response)."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError(where, "HH record: chosen and rejected share no '\\n\\nAssistant:' turn")
    end = cut + len(HH_ASSISTANT)
    prompt = parse_hh_dialogue(chosen[:end])[:-1]  # the last turn is the empty assistant turn being answered
    return prompt, chosen[end:].removeprefix(" "), rejected[end:].removeprefix(" ")


def _shared_prefix(a: list[Message], b: list[Message]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def parse_preference(record: dict, where: str) -> tuple[Prompt, str, str]:
    _require(record, where, "chosen", "rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = _prompt(record["prompt"], where)
        if isinstance(prompt, str) and (isinstance(chosen, list) or isinstance(rejected, list)):
            prompt = [{"role": "user", "content": prompt}]
        return prompt, _response(chosen, where, "chosen"), _response(rejected, where, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return split_hh(chosen, rejected, where)
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        n = _shared_prefix(c, r)
        if not n == len(c) - 1 == len(r) - 1 or n == 0 or {c[-1]["role"], r[-1]["role"]} != {"assistant"}:
            raise DataError(where, "conversation pair without 'prompt': chosen and rejected must share all messages "
                                   "but a final assistant message each")
        return c[:n], c[-1]["content"], r[-1]["content"]
    raise DataError(where, "'chosen' and 'rejected' must both be strings or both lists of messages")


def _prompt_and_response(record: dict, where: str) -> tuple[Prompt, str]:
    """A record's ``prompt`` and ``response``; a text prompt answered by a message becomes a user message."""
    prompt = _prompt(record["prompt"], where)
    if isinstance(prompt, str) and isinstance(record["response"], list):
        prompt = [{"role": "user", "content": prompt}]
    return prompt, _response(record["response"], where, "response")


def _is_empty(prompt: Prompt) -> bool:
    return not prompt.strip() if isinstance(prompt, str) else not any(m["content"].strip() for m in prompt)


# --- readers ---------------------------------------------------------------------------------

def _records(paths: str | os.PathLike | Sequence[str | os.PathLike], limit: int = 0) -> Iterable[tuple[str, dict]]:
    """Records of all files in order; only the first ``limit`` when > 0."""
    n = 0
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        for item in iter_jsonl(path):
            if limit and n >= limit:
                return
            n += 1
            yield item


def read_preference_pairs(paths, stats: DataStats | None = None, limit: int = 0) -> list[PreferencePair]:
    """Preference pairs from JSONL files (any of the formats above, gzipped or not); ``limit`` > 0
    reads only that many records."""
    stats = stats if stats is not None else DataStats("preference pairs")
    pairs = []
    for where, record in _records(paths, limit):
        stats.read += 1
        prompt, chosen, rejected = parse_preference(record, where)
        if not chosen.strip() or not rejected.strip():
            stats.skip("empty response", where)
        elif chosen == rejected:
            stats.skip("chosen and rejected are identical", where)
        else:
            pairs.append(PreferencePair(prompt, chosen, rejected, where))
    return pairs


def read_scored(paths, stats: DataStats | None = None, limit: int = 0) -> list[ScoredResponse]:
    """``{"prompt", "response", "reward"}`` records; the reward is a finite number."""
    stats = stats if stats is not None else DataStats("scored responses")
    out = []
    for where, record in _records(paths, limit):
        stats.read += 1
        _require(record, where, "prompt", "response", "reward")
        reward = record["reward"]
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise DataError(where, f"'reward' must be a finite number, got {reward!r}")
        prompt, response = _prompt_and_response(record, where)
        if not response.strip():
            stats.skip("empty response", where)
            continue
        out.append(ScoredResponse(prompt, response, float(reward), where))
    return out


def read_prompts(paths, stats: DataStats | None = None, limit: int = 0) -> list[PromptRecord]:
    """Prompts for RL: ``{"prompt": str | messages}`` records, or preference records (their prompt)."""
    stats = stats if stats is not None else DataStats("prompts")
    out = []
    for where, record in _records(paths, limit):
        stats.read += 1
        if "prompt" in record:
            prompt = _prompt(record["prompt"], where)
        elif "chosen" in record and "rejected" in record:
            prompt = parse_preference(record, where)[0]
        else:
            raise DataError(where, f"missing field 'prompt' (has {', '.join(map(repr, record))})")
        if _is_empty(prompt):
            stats.skip("empty prompt", where)
            continue
        out.append(PromptRecord(prompt, where))
    return out


def read_demonstrations(paths, stats: DataStats | None = None, limit: int = 0) -> list[Demonstration]:
    """Supervised examples: ``{"prompt", "response"}`` records, or preference records (their chosen side)."""
    stats = stats if stats is not None else DataStats("demonstrations")
    out = []
    for where, record in _records(paths, limit):
        stats.read += 1
        if "response" in record:
            _require(record, where, "prompt")
            prompt, response = _prompt_and_response(record, where)
        elif "chosen" in record:
            prompt, response, _ = parse_preference(record, where)
        else:
            raise DataError(where, f"missing field 'response' or 'chosen' (has {', '.join(map(repr, record))})")
        if _is_empty(prompt):
            stats.skip("empty prompt", where)
        elif not response.strip():
            stats.skip("empty response", where)
        else:
            out.append(Demonstration(prompt, response, where))
    return out
