"""Data: JSONL readers (preference pairs, Anthropic HH, prompts, scored responses), templates,
tokenisation with end-keeping truncation, and padded value-training batches."""
from .collate import ValueBatch, ValueExample, collate_values
from .config import DataConfig
from .encode import EncodedSequence, Encoder, truncate
from .jsonl import DataError, iter_jsonl
from .records import (
    Demonstration,
    PreferencePair,
    PromptRecord,
    ScoredResponse,
    parse_hh_dialogue,
    parse_preference,
    read_demonstrations,
    read_preference_pairs,
    read_prompts,
    read_scored,
    split_hh,
)
from .stats import DataStats
from .templates import render_plain, render_prompt, render_response, resolve_template

__all__ = [
    "DataConfig", "DataError", "DataStats", "Demonstration", "EncodedSequence", "Encoder", "PreferencePair", "PromptRecord",
    "ScoredResponse", "ValueBatch", "ValueExample", "collate_values", "iter_jsonl", "parse_hh_dialogue",
    "parse_preference", "read_demonstrations", "read_preference_pairs", "read_prompts", "read_scored", "render_plain", "render_prompt",
    "render_response", "resolve_template", "split_hh", "truncate",
]
