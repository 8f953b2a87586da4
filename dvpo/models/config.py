"""Which model a stage trains: a local Hugging Face folder, or a small one built from these fields."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, option


@dataclass
class ModelConfig:
    path: str | None = option(None, "local Hugging Face model folder (a causal LM, or a saved model of this stage); "
                                    "null = build a new model from the fields below", path=True)
    tokenizer: str | None = option(None, "tokenizer folder (null = the model folder; with neither, a byte-level BPE "
                                         "tokenizer is trained on the training texts)", path=True)
    arch: Literal["llama", "qwen2"] = option("llama", "architecture of a model built from config")
    vocab_size: int = option(512, "vocabulary of a tokenizer trained on the fly")
    hidden_size: int = option(64, "hidden size of a model built from config")
    intermediate_size: int | None = option(None, "MLP size (null = 4 * hidden_size)")
    num_layers: int = option(2, "transformer layers of a model built from config")
    num_heads: int = option(4, "attention heads of a model built from config")
    num_kv_heads: int | None = option(None, "key/value heads (null = num_heads)")
    max_position_embeddings: int = option(4096, "longest sequence of a model built from config")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "parameter dtype (bf16 compute comes from train.precision; float32 master weights are safest)")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = option(
        "auto", "attention kernel; auto = flash_attention_2 when flash-attn is installed and the run is on CUDA, "
                "else sdpa")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    trainable_layers: int = option(0, "train only the top N decoder layers, the final norm and the head (an LM head "
                                      "tied to the embeddings stays frozen); 0 = all layers")
    lora_r: int = option(0, "LoRA rank on the backbone's linear layers (0 = train all weights; needs peft)")
    lora_alpha: float = option(16.0, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] = option(
        default_factory=list, help="names of the backbone linear layers LoRA adapts (empty = all of them)")

    def validate(self) -> None:
        if self.path is None:
            for name in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
            if self.hidden_size % self.num_heads:
                raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                                  f"model.num_heads ({self.num_heads})")
            kv = self.num_kv_heads or self.num_heads
            if self.num_heads % kv:
                raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({kv})")
        if self.path is None and self.tokenizer is None and self.vocab_size < 259:
            raise ConfigError(f"model.vocab_size must be at least 259 (256 bytes + 3 special tokens), "
                              f"got {self.vocab_size}")
        if self.lora_r < 0:
            raise ConfigError(f"model.lora_r must be >= 0, got {self.lora_r}")
        if self.trainable_layers < 0:
            raise ConfigError(f"model.trainable_layers must be >= 0, got {self.trainable_layers}")
        if self.trainable_layers and self.lora_r:
            raise ConfigError("model.trainable_layers and model.lora_r are alternatives; set one of them")
