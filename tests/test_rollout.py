"""Rollout generation: our decode loop against transformers' generate, left padding, EOS, sampling."""

import logging

import pytest
import torch
import transformers

from dvpo.rollout import RolloutEngine, generate, left_pad, position_ids_from_mask, sample_tokens

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33], [40]]
NEW = 12


def _tiny(arch: str, attn: str, dtype=torch.float32, **overrides):
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
        # Wide weights give peaked logits, so greedy argmaxes are far from ties.
        initializer_range=0.3,
    )
    common.update(overrides)
    config = transformers.LlamaConfig(**common) if arch == "llama" else transformers.Qwen2Config(**common)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype).eval()


@pytest.fixture(scope="module", params=[("llama", "sdpa"), ("qwen2", "eager")], ids=lambda p: "-".join(p))
def model(request):
    return _tiny(*request.param)


def _hf_greedy(model, prompts, eos):
    ids, mask = left_pad(prompts, PAD)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=eos
        )
    return out


def _greedy(model, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", NEW)
    return generate(model, prompts, pad_token_id=PAD, do_sample=False, **kw)


def test_greedy_matches_hf_generate(model):
    ours = _greedy(model, engine="eager")
    assert torch.equal(ours.sequences, _hf_greedy(model, PROMPTS, eos=[]))
    assert ours.response_mask.all() and not ours.finished.any()
    assert ours.response_lengths.tolist() == [NEW] * len(PROMPTS)


def test_greedy_with_eos_matches_hf_generate(model):
    free = _greedy(model, engine="eager").responses
    eos = int(free[0, 4])  # every row stops at the first occurrence of this token
    ours = _greedy(model, engine="eager", eos_token_id=eos)
    assert torch.equal(ours.sequences, _hf_greedy(model, PROMPTS, eos=eos))
    assert ours.finished[0] and ours.response_lengths[0] == int((free[0] == eos).nonzero()[0]) + 1


def test_hf_engine_matches_eager(model):
    free = _greedy(model, engine="eager").responses
    eos = [int(free[1, 2]), int(free[2, 6])]
    a = _greedy(model, engine="eager", eos_token_id=eos, return_logprobs=True)
    b = _greedy(model, engine="hf", eos_token_id=eos, return_logprobs=True)
    for field in ("sequences", "attention_mask", "position_ids", "response_mask", "response_lengths", "finished"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)


def test_hf_engine_ignores_model_generation_config_eos(model):
    free = _greedy(model, engine="eager").responses
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = int(free[0, 0])
    try:
        out = _greedy(model, engine="hf", eos_token_id=None)
    finally:
        model.generation_config.eos_token_id = saved
    assert torch.equal(out.responses, free)


def test_left_padding_positions(model):
    batch = _greedy(model, engine="eager", return_logprobs=True)
    width = batch.prompt_len
    for row, prompt in enumerate(PROMPTS):
        alone = _greedy(model, [prompt], engine="eager", return_logprobs=True)
        assert torch.equal(batch.responses[row], alone.responses[0])
        torch.testing.assert_close(batch.logprobs[row], alone.logprobs[0], rtol=1e-5, atol=1e-5)
        pad = width - len(prompt)
        assert batch.position_ids[row, pad:].tolist() == list(range(len(prompt) + NEW))
        assert batch.position_ids[row, :pad].tolist() == [0] * pad

    # The rollout's mask and position ids drive a training forward: the last prompt token of a left-padded row
    # must see exactly what it sees unpadded.
    with torch.no_grad():
        full = model(input_ids=batch.sequences, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        for row, prompt in enumerate(PROMPTS):
            alone = model(input_ids=torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(full.logits[row, width - 1], alone, rtol=1e-5, atol=1e-5)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_eos_stops_rows_and_masks_the_rest(model):
    free = _greedy(model, engine="eager").responses
    eos = int(free[0, 4])
    out = _greedy(model, engine="eager", eos_token_id=eos)
    hits = free == eos
    expected = torch.where(hits.any(1), hits.long().argmax(1) + 1, NEW)
    assert torch.equal(out.response_lengths, expected)
    assert torch.equal(out.finished, hits.any(1))
    width = int(expected.max())
    assert out.responses.shape[1] == width
    mask = torch.arange(width)[None] < expected[:, None]
    assert torch.equal(out.response_mask, mask)
    assert torch.equal(out.responses[mask], free[:, :width][mask])
    assert (out.responses[~mask] == PAD).all()
    assert torch.equal(out.attention_mask, torch.cat([left_pad(PROMPTS, PAD)[1], mask.long()], 1))
    for row in torch.nonzero(out.finished).flatten().tolist():
        assert out.responses[row, expected[row] - 1] == eos


def test_eos_as_first_token_gives_length_one(model):
    free = _greedy(model, engine="eager").responses
    eos = int(free[1, 0])
    out = _greedy(model, engine="eager", eos_token_id=eos, return_logprobs=True)
    assert out.response_lengths[1] == 1 and out.finished[1]
    assert out.responses[1, 0] == eos and (out.responses[1, 1:] == PAD).all()
    assert out.response_mask[1].tolist() == [True] + [False] * (out.responses.shape[1] - 1)
    assert (out.response_mask.sum(1) >= 1).all()
    assert torch.isfinite(out.logprobs).all() and (out.logprobs[1, 1:] == 0).all()


def test_all_rows_finishing_stops_the_loop(model):
    free = _greedy(model, engine="eager").responses
    eos = sorted({int(t) for t in free[:, 0]})  # every row stops on its first token
    out = _greedy(model, engine="eager", eos_token_id=eos)
    assert out.responses.shape[1] == 1 and out.finished.all()
    assert out.response_lengths.tolist() == [1] * len(PROMPTS)


def test_tensor_prompts_match_lists(model):
    ids, mask = left_pad(PROMPTS, PAD)
    a = _greedy(model, engine="eager")
    b = _greedy(model, ids, attention_mask=mask, engine="eager")
    assert torch.equal(a.sequences, b.sequences)
    # an unpadded tensor needs no mask
    c = _greedy(model, ids[:1], engine="eager")
    assert torch.equal(c.responses[0], a.responses[0])


def test_fixed_seed_reproduces_samples(model):
    def sample(seed, engine="eager"):
        g = torch.Generator().manual_seed(seed)
        return generate(
            model, PROMPTS, max_new_tokens=NEW, pad_token_id=PAD, temperature=1.3, generator=g, engine=engine
        )

    assert torch.equal(sample(1).sequences, sample(1).sequences)
    assert not torch.equal(sample(1).sequences, sample(2).sequences)
    assert torch.equal(sample(3, "hf").sequences, sample(3, "hf").sequences)


def test_top_k_one_is_greedy(model):
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, PROMPTS, max_new_tokens=NEW, pad_token_id=PAD, top_k=1, generator=g, engine="eager")
    assert torch.equal(sampled.sequences, _greedy(model, engine="eager").sequences)


def test_sampled_tokens_lie_in_top_k_of_the_model(model):
    g = torch.Generator().manual_seed(0)
    out = generate(model, PROMPTS, max_new_tokens=NEW, pad_token_id=PAD, top_k=3, generator=g, engine="eager")
    with torch.no_grad():
        logits = model(input_ids=out.sequences, attention_mask=out.attention_mask, position_ids=out.position_ids).logits
    step_logits = logits[:, out.prompt_len - 1 : -1]  # the logits that produced response token t
    top3 = step_logits.topk(3, dim=-1).indices
    assert (top3 == out.responses[..., None]).any(-1)[out.response_mask].all()


def test_sample_tokens_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    g = torch.Generator().manual_seed(0)

    def freq(**kw):
        tok = sample_tokens(logits, generator=g, **kw)
        return torch.bincount(tok, minlength=4).double() / tok.numel()

    plain = freq()
    torch.testing.assert_close(plain, probs.double(), atol=0.03, rtol=0)
    top_k = freq(top_k=2)
    assert top_k[2:].sum() == 0
    torch.testing.assert_close(top_k[:2], torch.tensor([0.625, 0.375], dtype=torch.float64), atol=0.03, rtol=0)
    assert freq(top_p=0.7)[2:].sum() == 0  # 0.5 < 0.7 needs the second token, whose 0.8 covers it
    assert freq(top_p=0.85)[3] == 0 and freq(top_p=0.85)[2] > 0
    assert freq(top_p=0.3)[1:].sum() == 0  # the most likely token always survives
    cold = freq(temperature=0.5)  # p^2 renormalised
    torch.testing.assert_close(cold, (probs**2 / (probs**2).sum()).double(), atol=0.03, rtol=0)
    assert torch.equal(sample_tokens(logits[:3], do_sample=False), torch.zeros(3, dtype=torch.long))


def test_engine_reuses_buffers_without_leaking_state(model):
    engine = RolloutEngine(model, engine="eager")
    long_prompts = [[7] * 9, [8, 9, 10]]
    short_prompts = [[11, 12], [13, 14, 15, 16]]
    engine.generate(long_prompts, max_new_tokens=NEW, pad_token_id=PAD, do_sample=False)
    state = engine._state
    second = engine.generate(short_prompts, max_new_tokens=NEW, pad_token_id=PAD, do_sample=False)
    assert engine._state is state  # same (batch, cache length): buffers refilled in place
    assert torch.equal(second.sequences, _greedy(model, short_prompts).sequences)
    engine.release()
    assert engine._state is None


def test_model_modes_are_restored():
    model = _tiny("llama", "sdpa")
    expected = _greedy(model, engine="eager").sequences
    # transformers 5.2x renamed the switch; either way the layers drop a cache passed in training mode
    enable_checkpointing = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable_checkpointing()
    model.train()
    model.model.norm.eval()
    assert torch.equal(_greedy(model, engine="eager").sequences, expected)
    assert model.training and model.model.layers[0].training and not model.model.norm.training


def test_auto_picks_eager_on_cpu(model):
    engine = RolloutEngine(model)
    engine.generate(PROMPTS, max_new_tokens=3, pad_token_id=PAD, do_sample=False)
    assert engine._state is not None and engine._state.graph is None


def test_sliding_window_goes_to_hf(caplog):
    model = _tiny("qwen2", "sdpa", use_sliding_window=True, sliding_window=4, max_window_layers=0)
    with pytest.raises(ValueError, match="engine='eager'.*sliding window"):
        _greedy(model, engine="eager")
    with caplog.at_level(logging.WARNING, logger="dvpo.rollout"):
        out = _greedy(model)
    assert "sliding window" in caplog.text
    assert torch.equal(out.sequences, _greedy(model, engine="hf").sequences)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(pad_token_id=128), "pad_token_id"),
        (dict(eos_token_id=[1, 999]), "eos_token_id"),
        (dict(engine="vllm"), "engine"),
        (dict(engine="cuda_graph"), "engine='cuda_graph'"),
        (dict(prompt_ids=[[1, 2], []]), "prompt_ids"),
        (dict(prompt_ids=[[1, 200]]), "prompt_ids"),
        (dict(prompt_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]])), "left-padded"),
        (dict(prompt_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1, 1]])), "attention_mask"),
        (dict(attention_mask=torch.ones(4, 7)), "attention_mask"),
        (dict(prompt_ids=torch.zeros(2, 0, dtype=torch.long)), "prompt_ids"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = _tiny("llama", "sdpa", num_hidden_layers=1)
    args = dict(prompt_ids=PROMPTS, max_new_tokens=4, pad_token_id=PAD)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


# -- GPU: the CUDA-graph engine against the eager loop ----------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def cuda_model():
    return _tiny("qwen2", "sdpa", dtype=torch.bfloat16, hidden_size=128, num_attention_heads=8, vocab_size=1024).cuda()


def _cuda_prompts(batch=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (batch,), generator=g)
    return [torch.randint(1, 1024, (int(n),), generator=g).tolist() for n in lengths]


@pytest.mark.gpu
@gpu
def test_cuda_graph_matches_eager_greedy(cuda_model):
    prompts = _cuda_prompts()
    kw = dict(max_new_tokens=40, pad_token_id=PAD, do_sample=False, return_logprobs=True)
    free = generate(cuda_model, prompts, engine="eager", **kw)
    eos = int(free.responses[0, 17])
    eager = generate(cuda_model, prompts, engine="eager", eos_token_id=eos, **kw)
    graph = generate(cuda_model, prompts, engine="cuda_graph", eos_token_id=eos, **kw)
    for field in ("sequences", "response_mask", "response_lengths", "finished"):
        assert torch.equal(getattr(eager, field), getattr(graph, field)), field
    torch.testing.assert_close(eager.logprobs, graph.logprobs, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@gpu
def test_cuda_graph_sampling_matches_eager_with_a_seed(cuda_model):
    prompts = _cuda_prompts(seed=1)

    def run(engine):
        g = torch.Generator(device="cuda").manual_seed(7)
        return generate(
            cuda_model, prompts, max_new_tokens=32, pad_token_id=PAD, top_p=0.9, top_k=50, generator=g, engine=engine
        )

    assert torch.equal(run("eager").sequences, run("cuda_graph").sequences)


@pytest.mark.gpu
@gpu
def test_cuda_graph_is_reused_across_calls(cuda_model):
    engine = RolloutEngine(cuda_model)  # auto -> cuda_graph on CUDA
    kw = dict(max_new_tokens=24, pad_token_id=PAD, do_sample=False)
    engine.generate(_cuda_prompts(seed=2), **kw)
    graph = engine._state.graph
    assert graph is not None
    prompts = _cuda_prompts(seed=3)
    second = engine.generate(prompts, **kw)
    assert engine._state.graph is graph
    assert torch.equal(second.sequences, generate(cuda_model, prompts, engine="eager", **kw).sequences)


# -- the transformers Cache protocol ----------------------------------------------------------------------------


def test_cache_is_a_transformers_cache_and_takes_any_update_arguments():
    from dvpo.rollout import _StaticKVCache

    cache = _StaticKVCache(8, torch.device("cpu"))
    assert isinstance(cache, transformers.Cache)
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 6)
    # Positional cache_kwargs (transformers 4.x), kwargs= (5.24+), and anything a later release may add.
    keys, values = cache.update(k, v, 1, {"cache_position": torch.arange(4)}, kwargs={"x": 1}, future=True)
    assert keys.shape == (2, 3, 8, 5) and values.shape == (2, 3, 8, 6)
    assert torch.equal(keys[:, :, :4], k) and torch.equal(values[:, :, :4], v)
    assert not keys[:, :, 4:].any() and len(cache.layers) == 2


def test_a_model_that_bypasses_the_cache_fails_loudly(monkeypatch):
    """If a transformers release stops writing through the cache we pass (a renamed keyword is swallowed by
    ``**kwargs``), decoding would silently attend to nothing: the engine must refuse instead."""
    import dvpo.rollout as rollout

    model = _tiny("llama", "sdpa")
    monkeypatch.setattr(rollout, "_cache_keyword", lambda model: "renamed_cache")
    with pytest.raises(RuntimeError, match="Cache protocol changed"):
        _greedy(model, engine="eager")


def test_the_cache_keyword_follows_the_installed_transformers(model):
    from dvpo.rollout import _cache_keyword

    import inspect

    params = inspect.signature(type(model).forward).parameters
    assert _cache_keyword(model) in params
