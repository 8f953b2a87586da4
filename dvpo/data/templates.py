"""Turning prompts and responses into text: the tokenizer's chat template or the plain HH style.

Raw-text prompts are used as they are and their responses appended verbatim. Conversations are
rendered with the chat template (``add_generation_prompt=True``; the response is the assistant's
content) or, for tokenizers without one, in the Anthropic HH style, where
``"\\n\\nHuman: hi\\n\\nAssistant:"`` is followed by ``" " + response``: an HH dialogue parsed by
:func:`dvpo.data.records.split_hh` renders back to its original text.
"""
from __future__ import annotations

from typing import Literal

from .records import Prompt

Template = Literal["auto", "chat", "plain"]
_PLAIN_ROLES = {"user": "Human", "assistant": "Assistant"}
_MARK = "dvpo-end-of-turn-probe"


def resolve_template(mode: str, tokenizer) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``plain``."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if mode == "auto":
        return "chat" if has_chat else "plain"
    if mode == "chat" and not has_chat:
        raise ValueError("data.template=chat but the tokenizer has no chat template")
    if mode not in ("chat", "plain"):
        raise ValueError(f"data.template must be auto, chat or plain, got {mode!r}")
    return mode


def render_plain(messages: list[dict[str, str]]) -> str:
    """HH-style text ending with the ``"\\n\\nAssistant:"`` cue; a system message is a raw preamble."""
    parts = []
    for msg in messages:
        if msg["role"] == "system":
            parts.append(msg["content"])
            continue
        role = _PLAIN_ROLES.get(msg["role"], msg["role"].capitalize())
        parts.append(f"\n\n{role}:" + (f" {msg['content']}" if msg["content"] else ""))
    return "".join(parts) + "\n\nAssistant:"


def render_prompt(prompt: Prompt, tokenizer, template: str) -> str:
    """The prompt's text; ``template`` is a resolved mode (``chat`` or ``plain``)."""
    if isinstance(prompt, str):
        return prompt
    if template == "chat":
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return render_plain(prompt)


def render_response(prompt: Prompt, response: str, template: str) -> str:
    """The response's text as it follows the rendered prompt (EOS is added as a token, not here)."""
    if isinstance(prompt, str) or template == "chat":
        return response
    return " " + response


def prompt_has_special_tokens(prompt: Prompt, template: str) -> bool:
    """A chat-templated prompt already carries its special tokens (BOS and the like)."""
    return not isinstance(prompt, str) and template == "chat"


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``): where a sampled turn ends. None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}],
                                         tokenize=False)
    ids = tokenizer.encode(text[text.index(_MARK) + len(_MARK):], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[0] if ids and ids[0] in special else None
