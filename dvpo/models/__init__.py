"""Models: configuration, tokenizers (pretrained or trained on the fly), Hugging Face loading, the value model."""
from .build import DTYPES, apply_lora, attn_implementation, config_from_fields, load_token_value_model
from .config import ModelConfig
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .value_model import ValueModel

__all__ = ["DTYPES", "ModelConfig", "ValueModel", "apply_lora", "attn_implementation", "config_from_fields",
           "load_token_value_model", "load_tokenizer", "train_bpe_tokenizer"]
