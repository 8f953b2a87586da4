"""Text and tokenisation options shared by every stage's data section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, option


@dataclass
class DataConfig:
    template: Literal["auto", "chat", "plain"] = option(
        "auto", "how conversations become text: the tokenizer's chat template (chat), HH style "
                "'\\n\\nHuman: ...\\n\\nAssistant:' (plain), or chat when the tokenizer has a template (auto)")
    max_length: int = option(1024, "tokens per sequence (prompt + response); see data.truncation for longer ones")
    truncation: Literal["drop", "prompt_left"] = option(
        "drop", "an example longer than data.max_length is dropped (drop, counted in data_stats.json), or its prompt "
                "loses tokens from the left (prompt_left; dropped if its response alone does not fit); a response "
                "is never cut")
    max_prompt_length: int | None = option(None, "cap on prompt tokens, cut from the left (null = no cap)")
    limit: int = option(0, "use only the first N records of the training files (0 = all)")

    def validate(self) -> None:
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"data.max_prompt_length must be >= 1 or null, got {self.max_prompt_length}")
        if self.limit < 0:
            raise ConfigError(f"data.limit must be >= 0, got {self.limit}")
