"""Building and loading Hugging Face models for the stages: attention choice, dtype, LoRA."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForTokenClassification, LlamaConfig, PretrainedConfig, Qwen2Config
from transformers.utils import is_flash_attn_2_available
from transformers.utils import logging as hf_logging

from .config import ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ARCH_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config}


def attn_implementation(requested: str, device: torch.device) -> str:
    """``auto`` -> flash_attention_2 when flash-attn is installed and the run is on CUDA, else sdpa."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"


def config_from_fields(cfg: ModelConfig, tokenizer) -> PretrainedConfig:
    """A small Llama/Qwen2-style config sized by ``cfg`` with the tokenizer's vocabulary and special ids."""
    return _ARCH_CONFIGS[cfg.arch](
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@contextlib.contextmanager
def _quiet_transformers():
    """Mute the load report of an intended architecture change (causal LM -> token classifier)."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def is_token_value_model(config: PretrainedConfig) -> bool:
    """A folder saved by a value stage: a ``*ForTokenClassification`` with a single output."""
    return config.num_labels == 1 and any(a.endswith("ForTokenClassification") for a in config.architectures or [])


def load_token_value_model(cfg: ModelConfig, tokenizer, device: torch.device) -> nn.Module:
    """``*ForTokenClassification`` with one label: the backbone plus ``score = Linear(hidden, 1)``.

    From ``cfg.path``: a saved value model loads as it is; a causal LM gives the backbone and a new
    head. Without a path the model is built from ``cfg``'s fields. A new head starts at zero."""
    kwargs = {"attn_implementation": attn_implementation(cfg.attn_implementation, device),
              "dtype": DTYPES[cfg.dtype]}
    if cfg.path is None:
        config = config_from_fields(cfg, tokenizer)
        config.num_labels, config.classifier_dropout = 1, 0.0
        model, new_head = AutoModelForTokenClassification.from_config(config, **kwargs), True
    else:
        config = AutoConfig.from_pretrained(cfg.path)
        new_head = not is_token_value_model(config)
        config.num_labels, config.classifier_dropout = 1, 0.0
        with _quiet_transformers() if new_head else contextlib.nullcontext():
            model = AutoModelForTokenClassification.from_pretrained(cfg.path, config=config, **kwargs)
        if new_head:
            log.info("backbone from %s with a new value head", cfg.path)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    if new_head:
        head = model.score
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    train_top_layers(model, cfg.trainable_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.to(device)


def train_top_layers(model: nn.Module, k: int) -> nn.Module:
    """Freeze all but the top ``k`` decoder layers, the final norm and the head (``score``, or an untied LM
    head: a head tied to the input embeddings stays frozen, as training it would train the embeddings and
    send the backward pass through every layer). ``k = 0`` leaves everything trainable."""
    if k <= 0:
        return model
    backbone = getattr(model, model.base_model_prefix)
    layers = backbone.layers
    if k > len(layers):
        raise ValueError(f"model.trainable_layers={k} but the model has {len(layers)} decoder layers")
    model.requires_grad_(False)
    for module in (*layers[len(layers) - k:], backbone.norm):
        module.requires_grad_(True)
    head = getattr(model, "score", None) or model.get_output_embeddings()
    if head.weight is not model.get_input_embeddings().weight:
        head.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("training the top %d of %d layers: %d of %d parameters", k, len(layers), trainable,
             sum(p.numel() for p in model.parameters()))
    return model


def apply_lora(model: nn.Module, cfg: ModelConfig, trainable_heads: tuple[str, ...] = ("score",)) -> nn.Module:
    """Wrap ``model`` with LoRA adapters on its backbone's linear layers; ``trainable_heads`` stay fully
    trainable. Returns the PEFT model."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("model.lora_r > 0 needs peft: pip install 'dvpo[lora]'") from None
    backbone = getattr(model, model.base_model_prefix)
    targets = cfg.lora_target_modules or sorted(
        {name.rsplit(".", 1)[-1] for name, m in backbone.named_modules() if isinstance(m, nn.Linear)})
    peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                  lora_dropout=cfg.lora_dropout, target_modules=targets, bias="none"))
    for name in trainable_heads:
        getattr(model, name).requires_grad_(True)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on %s: %d of %d parameters trainable", cfg.lora_r, ",".join(targets), trainable, total)
    return peft_model
