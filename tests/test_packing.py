"""Padding-free packed forwards equal the padded ones: log-probs, values, losses and gradients."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, LlamaConfig, Qwen2Config

from dvpo.models import PolicyModel, ValueModel, masked_logprobs
from dvpo.models import packing
from dvpo.models.packing import pack, set_packing, should_pack, supports_packing, unpack

VOCAB, PAD = 97, 0


def _config(arch: str, **kw):
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, tie_word_embeddings=False, **kw)


def _models(arch: str, attn: str):
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(_config(arch), attn_implementation=attn, dtype=torch.float32)
    vm = AutoModelForTokenClassification.from_config(_config(arch, num_labels=1), attn_implementation=attn,
                                                     dtype=torch.float32)
    return PolicyModel(lm), ValueModel(vm)


@contextlib.contextmanager
def mode(name: str):
    before = packing.packing_mode()
    set_packing(name)
    try:
        yield
    finally:
        set_packing(before)


def _batch(lengths: list[int], width: int, side: str, seed: int = 0):
    """Rows of ``lengths`` valid tokens padded to ``width`` on ``side``; positions counted per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        if n:
            (mask[b, width - n:] if side == "left" else mask[b, :n]).fill_(1)
    ids = ids.masked_fill(mask == 0, PAD)
    positions = packing.sequence_positions(mask) if side == "left" else None
    return ids, mask, positions


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _policy_pass(policy, ids, mask, positions):
    """Response log-probs (last 4 columns, masked) and the gradient of their sum."""
    targets, resp = ids[:, 1:], (mask[:, 1:] * mask[:, :-1]).bool()  # a token read from a valid state
    resp[:, :-4] = False

    def head(hidden, weight, bias):
        return masked_logprobs(hidden[:, :-1], weight, bias, targets, resp, return_entropy=True)

    logp, entropy = policy(ids, mask, head, positions)
    loss = -(logp.sum() + 0.1 * entropy.sum()) / resp.sum().clamp(min=1)
    loss.backward()
    return logp.detach(), loss.detach(), _grads(policy)


def _value_pass(vm, ids, mask, positions):
    values = vm(ids, mask, positions)
    values = torch.where(mask.bool(), values, 0.0)
    loss = ((values - 0.5) ** 2).sum() / mask.sum().clamp(min=1)
    loss.backward()
    return values.detach(), loss.detach(), _grads(vm)


def _assert_same(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("arch,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
@pytest.mark.parametrize("side", ["left", "right"])
def test_packed_equals_padded(arch, attn, side):
    policy, vm = _models(arch, attn)
    # one-token and empty rows among ordinary ones; odd lengths and width
    ids, mask, positions = _batch([13, 1, 7, 0, 17], 17, side, seed=3)
    assert should_pack(policy.hf_model, mask, positions)
    results = {}
    for name in ("off", "on"):
        with mode(name):
            results[name] = (_policy_pass(policy, ids, mask, positions), _value_pass(vm, ids, mask, positions))
    for (off, on), label in zip(zip(results["off"], results["on"]), ("policy", "value")):
        valid = mask.bool() if label == "value" else (mask[:, 1:] * mask[:, :-1]).bool()
        _assert_same(torch.where(valid, on[0], 0.0), torch.where(valid, off[0], 0.0), f"{label} outputs")
        _assert_same(on[1], off[1], f"{label} loss")
        assert on[2].keys() == off[2].keys() and on[2]
        for key in off[2]:
            _assert_same(on[2][key], off[2][key], f"{label} grad {key}")


def test_packed_forward_runs_only_valid_tokens():
    """The backbone sees one row of the valid tokens with per-sequence positions; padding gets zeros."""
    policy, _ = _models("llama", "sdpa")
    ids, mask, positions = _batch([5, 2, 0, 3], 6, "left")
    seen = []
    hook = policy.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    with mode("auto"):
        hidden = policy.encode(ids, mask, positions)
    hook.remove()
    # sdpa: rows no wider than the batch, longest sequence first, each into the first row with room
    assert seen[0]["attention_mask"] is None
    assert seen[0]["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert seen[0]["input_ids"].tolist() == [ids[0, 1:].tolist(), ids[3, 3:].tolist() + ids[1, 4:].tolist()]
    assert torch.equal(hidden[~mask.bool()], torch.zeros_like(hidden[~mask.bool()]))


def test_empty_batch_keeps_graph():
    policy, _ = _models("llama", "sdpa")
    ids, mask, _ = _batch([0, 0], 4, "right")
    with mode("on"):
        hidden = policy.encode(ids, mask)
    assert hidden.shape == (2, 4, 32) and not hidden.any()
    hidden.sum().backward()  # a sharded backward needs every rank to reach the parameters
    assert all(p.grad is not None for p in policy.backbone.layers[0].parameters())


@pytest.mark.parametrize("width", [None, 5, 7])
def test_pack_unpack_roundtrip(width):
    ids, mask, _ = _batch([3, 0, 4, 1, 5, 2], 5, "left", seed=1)
    packed = pack(ids, mask, width)
    if width is None:  # flash-attn: one row of every valid token
        assert packed.input_ids.shape == (1, 15)
    else:  # rows as wide as the longest sequence or ``width``, filled first-fit
        assert packed.input_ids.shape[1] <= max(width, 5) and packed.input_ids.shape[0] == -(-15 // max(width, 5))
    back = unpack(packed.input_ids[..., None].float(), packed)[..., 0]
    assert torch.equal(back, torch.where(mask.bool(), ids, 0).float())
    # every sequence starts at position 0 and counts up; row-end padding starts a sequence of its own
    assert sorted(packed.position_ids.reshape(-1)[packed.target].tolist()) == \
        sorted(packing.sequence_positions(mask)[mask.bool()].tolist())
    with pytest.raises(ValueError, match="attention_mask"):
        pack(ids, mask[:, 1:])


def test_auto_mode_choices():
    policy, _ = _models("llama", "sdpa")
    ids, mask, positions = _batch([3, 5], 5, "left")
    with mode("auto"):
        assert not should_pack(policy.hf_model, torch.ones_like(mask), None)  # nothing to save
        assert not should_pack(policy.hf_model, mask, None)  # default positions differ from packed ones
        assert should_pack(policy.hf_model, mask, positions)
    with mode("on"), pytest.raises(ValueError, match="position_ids"):
        should_pack(policy.hf_model, mask, None)
    with mode("off"):
        assert not should_pack(policy.hf_model, mask, positions)
    with pytest.raises(ValueError, match="packing"):
        set_packing("sometimes")


def test_supported_attention():
    policy, _ = _models("llama", "sdpa")
    assert supports_packing(policy.hf_model)
    policy.hf_model.config._attn_implementation = "flash_attention_2"
    assert supports_packing(policy.hf_model)
    policy.hf_model.config._attn_implementation = "flex_attention"
    assert not supports_packing(policy.hf_model)
    with mode("on"), pytest.raises(ValueError, match="cannot run packed"):
        should_pack(policy.hf_model, torch.tensor([[1, 0]]), None)


def test_auto_attention_picks_flash_attn_when_installed(monkeypatch):
    from dvpo.models import build

    monkeypatch.setattr(build, "is_flash_attn_2_available", lambda: True)
    assert build.attn_implementation("auto", torch.device("cuda")) == "flash_attention_2"
    assert build.attn_implementation("auto", torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(build, "is_flash_attn_2_available", lambda: False)
    assert build.attn_implementation("auto", torch.device("cuda")) == "sdpa"


def test_flash_attn_model_decodes_with_sdpa():
    """A model set to flash-attn (which trains packed rows) rolls out on the static-cache engine with sdpa."""
    from dvpo.rollout import RolloutEngine

    policy, _ = _models("llama", "sdpa")
    model = policy.hf_model.eval()
    kw = dict(max_new_tokens=5, pad_token_id=PAD, do_sample=False)
    expected = RolloutEngine(model, "eager").generate([[5, 6, 7], [8, 9]], **kw)
    model.config._attn_implementation = "flash_attention_2"
    got = RolloutEngine(model, "eager").generate([[5, 6, 7], [8, 9]], **kw)  # raises without the switch
    assert model.config._attn_implementation == "flash_attention_2"
    assert torch.equal(got.sequences, expected.sequences)


def test_train_packing_option_sets_the_mode(tmp_path):
    from dvpo.trainer import TrainConfig, start_run

    cfg = TrainConfig(output_dir=str(tmp_path), packing="off", device="cpu")
    with mode("auto"):
        start_run(cfg, cfg)
        assert packing.packing_mode() == "off"
