"""Models: configuration, tokenizers (pretrained or trained on the fly), Hugging Face loading, the policy and
value wrappers."""
from .build import DTYPES, apply_lora, attn_implementation, config_from_fields, load_token_value_model
from .config import ModelConfig
from .policy import PolicyModel, load_causal_lm, masked_logprobs
from .tokenizer import load_tokenizer, train_bpe_tokenizer
from .value_model import ValueModel

__all__ = ["DTYPES", "ModelConfig", "PolicyModel", "ValueModel", "apply_lora", "attn_implementation",
           "config_from_fields", "load_causal_lm", "load_token_value_model", "load_tokenizer", "masked_logprobs",
           "train_bpe_tokenizer"]
