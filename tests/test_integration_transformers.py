"""apply_dvpo_kernels on tiny Hugging Face causal LMs: log-probs, entropies and gradients equal the logits
path (padded, packed, LoRA, by class), and no [tokens, vocab] tensor is ever allocated."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import dvpo_kernels as dk
from _helpers import LargestTensor
from dvpo_kernels.integrations.transformers import apply_dvpo_kernels

V = 101
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2"]


def tiny(family: str, seed: int = 0):
    cfg = transformers.AutoConfig.for_model(family, vocab_size=V, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=8, max_position_embeddings=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


def logits_path(model, ids, mask, labels, temperature=1.0, **kw):
    """Hugging Face's own forward: full logits, then log_softmax at the shifted labels."""
    logits = model(input_ids=ids, attention_mask=mask, **kw).logits.float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    tgt = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
    valid = tgt != -100
    logp = logp_all.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * valid
    ent = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logp, ent, valid


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # only the completion is scored
    return ids, mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_and_grads_equal_logits_path(family):
    model = tiny(family)
    ids, mask, labels = padded_batch()
    ref_lp, ref_ent, valid = logits_path(model, ids, mask, labels, temperature=0.8)
    (ref_lp.sum() + 0.3 * ref_ent.sum()).backward()
    ref_g = grads(model)
    model.zero_grad()
    apply_dvpo_kernels(model, return_entropy=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, temperature=0.8)
    (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
    assert out.log_probs.shape == ids.shape and out.log_probs.dtype == torch.float32
    torch.testing.assert_close(out.log_probs, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.label_mask, valid)
    assert out.loss.item() == pytest.approx(-(ref_lp.sum() / valid.sum()).item(), rel=1e-5)
    g = grads(model)
    assert g.keys() == ref_g.keys()
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)
    # without labels the forward is the original one (generation keeps working)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (*ids.shape, V)


def test_no_tokens_by_vocab_tensor():
    model = apply_dvpo_kernels(tiny("llama"))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (4, 20), generator=g)  # attention scores [4, 4, 20, 20] < [80, V]
    old = dk.set_max_block_elements(8 * V)
    try:
        with LargestTensor() as probe:
            out = model(input_ids=ids, labels=ids, return_entropy=True)
            (out.loss + out.entropy.mean()).backward()
    finally:
        dk.set_max_block_elements(old)
    n = ids.numel()
    assert probe.largest < n * V
    with LargestTensor() as logits_probe:  # the probe does see the logits path's [tokens, vocab] tensor
        model(input_ids=ids)
    assert logits_probe.largest >= n * V


def test_packed_sequences_equal_separate_rows():
    model = apply_dvpo_kernels(tiny("qwen2"))
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, V, (1, 6), generator=g), torch.randint(0, V, (1, 5), generator=g)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(6), torch.arange(5)])[None]
    out = model(input_ids=packed, position_ids=pos, labels=packed)
    sep = [model(input_ids=x, labels=x).log_probs for x in (a, b)]
    torch.testing.assert_close(out.log_probs, torch.cat(sep, 1), rtol=1e-5, atol=1e-5)
    assert out.log_probs[0, 5] == 0 and not out.label_mask[0, 5]  # a's last token does not predict b


def test_shift_labels_and_class_patch():
    from transformers import LlamaForCausalLM

    cls = type("PatchedLlama", (LlamaForCausalLM,), {})
    apply_dvpo_kernels(cls)
    apply_dvpo_kernels(cls)  # patching twice is one patch
    model = cls(tiny("llama").config)
    ids, mask, labels = padded_batch()
    ref_lp, _, _ = logits_path(model, ids, mask, labels)
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    out = model(input_ids=ids, attention_mask=mask, shift_labels=shifted)
    torch.testing.assert_close(out.log_probs, ref_lp, rtol=1e-5, atol=1e-5)
    assert cls.forward.__dvpo_original__ is LlamaForCausalLM.forward


def test_lora_model():
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, mask, labels = padded_batch()
    ref_lp, _, _ = logits_path(lora, ids, mask, labels)
    ref_lp.sum().backward()
    ref_g = grads(lora)
    lora.zero_grad()
    apply_dvpo_kernels(lora)
    out = lora(input_ids=ids, attention_mask=mask, labels=labels)
    out.log_probs.sum().backward()
    torch.testing.assert_close(out.log_probs, ref_lp, rtol=1e-5, atol=1e-5)
    g = grads(lora)
    assert g.keys() == ref_g.keys() and all("lora" in n for n in g)
    for n in g:
        torch.testing.assert_close(g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bad_model_is_a_value_error():
    with pytest.raises(ValueError, match="model"):
        apply_dvpo_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="model"):
        apply_dvpo_kernels(torch.nn.Linear)
