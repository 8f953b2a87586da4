"""Rollout generation: sample responses from a Hugging Face causal LM for the policy-training stages.

Three engines return the same `Rollout`:

* ``eager``: our decode loop over a preallocated KV cache (``[B, kv_heads, L, head_dim]`` per layer) driven
  by explicit position ids and a 4-D attention mask, so left-padded batches decode exactly like unpadded
  prompts. Runs on any device.
* ``cuda_graph``: the same loop with the single-token forward captured once in a CUDA graph and replayed
  every step. At RL batch sizes decoding is bound by kernel-launch and Python overhead, not by the GPU;
  replay removes both. Sampling and EOS bookkeeping stay outside the graph (a handful of kernels, no host
  syncs), so both engines draw the same random numbers and agree token for token.
* ``hf``: ``model.generate`` -- the reference, and the path for attention kernels that take no 4-D mask.

``auto`` picks ``cuda_graph`` on CUDA, ``eager`` elsewhere, ``hf`` when the model's attention cannot run
the static path, and falls back to ``eager`` with a warning if graph capture fails.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import Cache, CacheLayerMixin

from .models.attention import decoding_attention

log = logging.getLogger(__name__)

ENGINES = ("auto", "eager", "cuda_graph", "hf")
# Attention implementations that accept our 4-D mask over the whole static cache.
_STATIC_ATTENTION = ("sdpa", "eager")
# The cache length is rounded up to this multiple so one captured graph serves prompts of nearby lengths.
_CACHE_ALIGN = 64
# On CUDA the all-rows-finished test costs a host sync; doing it every few steps keeps the GPU queue full.
_CUDA_SYNC_EVERY = 8
_GRAPH_WARMUP_STEPS = 2


@dataclass
class Rollout:
    """A batch of prompts with their sampled responses.

    ``sequences`` is ``[B, P + R]``: the left-padded prompts followed by right-padded responses, ready for a
    training forward with ``attention_mask`` and ``position_ids``. Response token ``t`` of row ``b`` is
    ``sequences[b, prompt_len + t]``; it is real where ``response_mask[b, t]`` (up to and including the first
    EOS) and ``pad_token_id`` after. Every row has at least one response token.
    """

    sequences: torch.Tensor  # [B, P + R] int64
    attention_mask: torch.Tensor  # [B, P + R] int64, 1 on prompt and response tokens
    position_ids: torch.Tensor  # [B, P + R] int64, cumsum(attention_mask) - 1 clamped at 0
    prompt_len: int  # P
    response_mask: torch.Tensor  # [B, R] bool
    response_lengths: torch.Tensor  # [B] int64, response_mask.sum(1), EOS included
    finished: torch.Tensor  # [B] bool: the row ended with EOS (False: cut at max_new_tokens)
    logprobs: torch.Tensor | None = None  # [B, R] fp32 log p(token) under logits / temperature, 0 where masked

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: real tokens count 0, 1, 2, ... from the first one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (input_ids [B, P], attention_mask [B, P]), both int64 and left-padded."""
    if len(prompts) == 0:
        raise ValueError("prompt_ids: empty batch")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids: prompt {row} is empty; every prompt needs at least one token")
        ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def sample_tokens(
    logits: torch.Tensor,
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy, or temperature -> top-k -> top-p (nucleus) sampling.

    Top-k keeps the tokens scoring at least the k-th largest score (ties kept); top-p keeps the smallest
    prefix of the descending-probability order whose mass reaches ``top_p`` (the most likely token always
    survives). The same semantics as transformers' logits warpers.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_scores = sorted_scores.masked_fill(mass_before >= top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter_(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    # argmax(p / E), E ~ Exp(1), is a draw from p (the exponential form of the Gumbel-max trick) that needs no
    # host sync, unlike torch.multinomial. The clamp keeps 0/0 = NaN from picking a removed token.
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


class _SlotLayer(CacheLayerMixin):
    """One layer's preallocated K/V, written at the cache's shared ``write_pos`` (a device scalar, so a captured
    graph replays the write at the current slot). Buffers are allocated on the first update, from the shapes the
    model actually produces (head counts and head dims differ between architectures and config spellings).
    ``update`` takes whatever else the attention call passes (``cache_kwargs``, ``kwargs=``, ...): positions come
    from ``write_pos``, never from those arguments."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: "_StaticKVCache"):
        super().__init__()
        # Set here rather than trusting the base class: which of these it sets differs between releases.
        self.keys = self.values = None
        self.is_initialized = False
        self._cache = cache
        self.writes = 0  # host-side count, read by the protocol check after prefill

    def lazy_initialization(self, key_states, value_states, *args, **kwargs) -> None:
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, self._cache.max_len, d)
        self.values = value_states.new_zeros(b, value_states.shape[1], self._cache.max_len, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        slots = self._cache.write_pos + self._cache.offsets[: key_states.shape[-2]]
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.writes += 1
        return self.keys, self.values

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self._cache.max_len, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self._cache.seen

    def get_max_length(self) -> int:
        return self._cache.max_len

    def get_max_cache_shape(self) -> int:
        return self._cache.max_len


class _StaticKVCache(Cache):
    """Preallocated K/V of every layer behind transformers' public ``Cache`` class.

    Decoder layers only call ``update`` (returning the whole buffer; our 4-D mask hides unwritten slots) once
    position ids and a 4-D mask are given, so ``update`` accepts any extra arguments the attention call passes:
    releases that add keywords (5.24's ``kwargs=``) do not break it. That the model really wrote through this
    cache is checked after every prefill (`check_protocol`), so a release that bypasses it fails loudly.
    """

    def __init__(self, max_len: int, device: torch.device):
        self.max_len = max_len
        self.write_pos = torch.zeros((), dtype=torch.long, device=device)
        self.seen = 0  # host-side mirror of write_pos for get_seq_length
        self.offsets = torch.arange(max_len, device=device)
        super().__init__(layers=[])  # one layer per attention layer, added on its first update

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(_SlotLayer(self))
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        return self.seen

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_len, 0

    def reset_write_counts(self) -> None:
        for layer in self.layers:
            layer.writes = 0

    def check_protocol(self, error: Exception | None = None) -> None:
        """Every attention layer wrote exactly once since `reset_write_counts` (``error``: what the forward
        raised, when it did -- a model that never wrote through the cache fails on the mask's shape first)."""
        writes = [layer.writes for layer in self.layers]
        if not writes or any(w != 1 for w in writes):
            import transformers

            raise RuntimeError(
                f"rollout: transformers {transformers.__version__} did not write through the rollout KV cache "
                f"(writes per layer: {writes}); its Cache protocol changed. Use engine='hf' meanwhile."
            ) from error


class _DecodeState:
    """Every buffer the decode step reads or writes, for one (batch, cache length); a captured graph is
    bound to these addresses, so later calls of the same shape refill them in place and replay."""

    def __init__(self, batch: int, max_len: int, device: torch.device):
        self.cache = _StaticKVCache(max_len, device)
        self.input_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position_ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.key_ok = torch.zeros((batch, max_len), dtype=torch.bool, device=device)  # attendable cache slots
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.graph_failed = False


@contextmanager
def _inference(model: torch.nn.Module):
    """eval() for the duration (dropout off; gradient checkpointing would otherwise drop the cache), then
    every submodule's own train/eval flag back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _cache_keyword(model) -> str:
    """The forward keyword that takes a cache: ``cache`` from transformers 5.24 on (``past_key_values`` is a
    deprecated alias there), ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _attn_implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _static_unsupported(model, total_len: int) -> str | None:
    """Why the static-cache engines cannot run this model (None when they can)."""
    attn = _attn_implementation(model)
    if attn not in _STATIC_ATTENTION:
        return f"attention implementation {attn!r} takes no 4-D mask (need one of {_STATIC_ATTENTION})"
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    window = getattr(model.config, "sliding_window", None)
    if layer_types - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(layer_types)} are not plain attention"
    if "sliding_attention" in layer_types and window is not None and window < total_len:
        return f"sliding window {window} is shorter than prompt + response ({total_len})"
    return None


def _is_sharded(model) -> bool:
    # FSDP2 parameters are DTensors whose forward all-gathers; collectives must not be baked into a graph.
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _all_ranks_done(done: torch.Tensor, sharded: bool) -> bool:
    """Every row finished -- on every rank when the model is sharded, since each forward is a collective
    and all ranks must run the same number of decode steps."""
    flag = done.all()
    if sharded and torch.distributed.is_initialized():
        flag = flag.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


class RolloutEngine:
    """Generation bound to one model. Keeps the decode buffers (and the captured CUDA graph) of the last
    batch shape, so that repeated rollouts of the same batch size reuse them; `release()` frees them."""

    def __init__(self, model: torch.nn.Module, engine: str = "auto"):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model = model
        self.engine = engine
        self._state: _DecodeState | None = None
        self._state_key: tuple | None = None
        self._sharded = False
        self._cache_kw = _cache_keyword(model)

    def release(self) -> None:
        """Drop the KV cache and captured graph (they hold memory between calls)."""
        self._state = None
        self._state_key = None

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
        *,
        max_new_tokens: int,
        pad_token_id: int,
        eos_token_id: int | Sequence[int] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        do_sample: bool = True,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        return_logprobs: bool = False,
    ) -> Rollout:
        device = next(self.model.parameters()).device
        vocab = self.model.get_input_embeddings().num_embeddings
        _check_sampling(max_new_tokens, temperature, top_p, top_k, pad_token_id, vocab, generator, device)
        eos = _eos_list(eos_token_id, vocab)
        ids, mask = _prompt_batch(prompt_ids, attention_mask, pad_token_id, vocab, device)
        cache_len = _round_up(ids.shape[1] + max_new_tokens, _CACHE_ALIGN)
        self._sharded = _is_sharded(self.model)
        sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        with decoding_attention(self.model), _inference(self.model):
            engine = self._resolve(device, cache_len)
            if engine == "hf":
                tokens, lengths, finished, logprobs = self._hf(
                    ids, mask, max_new_tokens, pad_token_id, eos, sampling, return_logprobs
                )
            else:
                tokens, lengths, finished, logprobs = self._static(
                    ids, mask, cache_len, engine, max_new_tokens, pad_token_id, eos, sampling, return_logprobs
                )
        return _assemble(ids, mask, tokens, lengths, finished, logprobs, pad_token_id)

    # -- engine choice ---------------------------------------------------------------------------------------

    def _resolve(self, device: torch.device, cache_len: int) -> str:
        if self.engine == "hf":
            return "hf"
        reason = _static_unsupported(self.model, cache_len)
        if self.engine == "auto":
            if reason is not None:
                log.warning("rollout: using transformers generate because %s", reason)
                return "hf"
            return "cuda_graph" if device.type == "cuda" and not _is_sharded(self.model) else "eager"
        if reason is not None:
            raise ValueError(f"engine={self.engine!r} cannot run this model: {reason}")
        if self.engine == "cuda_graph" and device.type != "cuda":
            raise ValueError(f"engine='cuda_graph' needs the model on a CUDA device, it is on {device}")
        return self.engine

    # -- static-cache engines --------------------------------------------------------------------------------

    def _state_for(self, batch: int, cache_len: int, device: torch.device) -> _DecodeState:
        # Parameter addresses are part of the key: a graph replays reads from the addresses it was captured
        # with, so reallocated weights (not in-place optimizer updates) need a fresh capture.
        key = (batch, cache_len, device, tuple(p.data_ptr() for p in self.model.parameters()))
        if key != self._state_key:
            self._state = None  # free the old buffers before allocating new ones
            self._state = _DecodeState(batch, cache_len, device)
            self._state_key = key
        return self._state

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean [B, 1, Q, L] -> the mask the attention implementation expects (bool for sdpa, additive
        otherwise, as transformers builds them)."""
        if _attn_implementation(self.model) == "sdpa":
            return allowed
        dtype = self.model.get_input_embeddings().weight.dtype
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def _forward(self, state: _DecodeState, input_ids, position_ids, allowed) -> torch.Tensor:
        # use_cache=False with an explicit cache: the layers still write to it, and the model makes no cache
        # of its own nor converts ours.
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask(allowed),
            position_ids=position_ids,
            **{self._cache_kw: state.cache},
            use_cache=False,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def _prefill(self, state: _DecodeState, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        plen = ids.shape[1]
        state.key_ok.zero_()
        state.key_ok[:, :plen] = mask.bool()
        state.cache.write_pos.zero_()
        state.cache.seen = 0
        q = torch.arange(plen, device=ids.device)[:, None]
        k = torch.arange(state.key_ok.shape[1], device=ids.device)[None, :]
        # Causal over real tokens; a pad query also sees itself so that no row is fully masked (NaN in SDPA).
        allowed = (state.key_ok[:, None, :] & (k <= q)) | (k == q)
        state.cache.reset_write_counts()
        try:
            logits = self._forward(state, ids, position_ids_from_mask(mask), allowed[:, None])
        except Exception as err:
            state.cache.check_protocol(err)
            raise
        state.cache.check_protocol()
        state.cache.write_pos.fill_(plen)
        state.cache.seen = plen
        state.position_ids.copy_(mask.sum(dim=1, keepdim=True))
        return logits

    def _decode_step(self, state: _DecodeState) -> torch.Tensor:
        """One token per row from ``state.input_ids``; everything it touches lives in ``state``."""
        state.key_ok.index_fill_(1, state.cache.write_pos.view(1), True)
        logits = self._forward(state, state.input_ids, state.position_ids, state.key_ok[:, None, None, :])
        state.position_ids.add_(1)
        state.cache.write_pos.add_(1)
        return logits

    def _capture(self, state: _DecodeState) -> None:
        """Record one decode step into a CUDA graph bound to ``state``'s buffers.

        Warm-up steps (on a side stream, as capture requires) run the step for real, so the positions and
        the attendable-slot mask are put back afterwards; the K/V they wrote sit in slots the real steps
        overwrite before any query can see them.
        """
        saved = (state.position_ids.clone(), state.cache.write_pos.clone(), state.key_ok.clone())
        device = state.input_ids.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(_GRAPH_WARMUP_STEPS):
                    self._decode_step(state)
            torch.cuda.current_stream(device).wait_stream(stream)
        finally:
            state.position_ids.copy_(saved[0])
            state.cache.write_pos.copy_(saved[1])
            state.key_ok.copy_(saved[2])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self._decode_step(state)
        state.graph, state.graph_logits = graph, logits

    def _graph_step(self, state: _DecodeState, explicit: bool) -> torch.Tensor:
        if state.graph is None and not state.graph_failed:
            try:
                self._capture(state)
            except Exception as err:  # an op that cannot be captured (host sync, unsupported kernel)
                if explicit:
                    raise RuntimeError(f"engine='cuda_graph': capturing the decode step failed: {err}") from err
                log.warning("rollout: CUDA graph capture failed (%s); decoding eagerly", err)
                state.graph_failed = True
        if state.graph is None:
            return self._decode_step(state)
        state.graph.replay()
        return state.graph_logits

    def _static(self, ids, mask, cache_len, engine, max_new, pad, eos, sampling, return_logprobs):
        batch, device = ids.shape[0], ids.device
        state = self._state_for(batch, cache_len, device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        tokens = torch.full((batch, max_new), pad, dtype=torch.long, device=device)
        logprobs = torch.zeros((batch, max_new), dtype=torch.float32, device=device) if return_logprobs else None
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        sync_every = _CUDA_SYNC_EVERY if device.type == "cuda" else 1

        logits = self._prefill(state, ids, mask)
        for t in range(max_new):
            tok = sample_tokens(logits, **sampling).masked_fill(done, pad)
            tokens[:, t] = tok
            if logprobs is not None:
                scaled = logits.float() / sampling["temperature"]
                logprobs[:, t] = scaled.log_softmax(dim=-1).gather(1, tok[:, None]).squeeze(1)
            lengths += ~done  # counts the EOS token itself
            if eos_ids is not None:
                done |= torch.isin(tok, eos_ids)
            if t + 1 == max_new:
                break
            if eos_ids is not None and (t + 1) % sync_every == 0 and _all_ranks_done(done, self._sharded):
                break
            state.input_ids.copy_(tok[:, None])
            state.cache.seen += 1
            if engine == "cuda_graph":
                logits = self._graph_step(state, explicit=self.engine == "cuda_graph")
            else:
                logits = self._decode_step(state)
        return tokens, lengths, done, logprobs

    # -- transformers generate -------------------------------------------------------------------------------

    def _hf(self, ids, mask, max_new, pad, eos, sampling, return_logprobs):
        kwargs = dict(
            max_new_tokens=max_new,
            do_sample=sampling["do_sample"],
            pad_token_id=pad,
            # [] rather than None: None would be filled in from the model's generation_config.
            eos_token_id=list(eos),
            repetition_penalty=1.0,
            return_dict_in_generate=True,
            output_logits=return_logprobs,
            synced_gpus=self._sharded,
        )
        if sampling["do_sample"]:
            kwargs.update(temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"])
        generator = sampling["generator"]
        if generator is None:
            out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            # generate() draws from the global RNG: seed it from the caller's generator, then restore it.
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
            devices = [ids.device] if ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        tokens = out.sequences[:, ids.shape[1] :]
        width = tokens.shape[1]
        is_eos = torch.isin(tokens, torch.tensor(eos, dtype=torch.long, device=ids.device))
        finished = is_eos.any(dim=1)
        lengths = torch.where(finished, is_eos.long().argmax(dim=1) + 1, width)
        logprobs = None
        if return_logprobs:
            scaled = torch.stack(out.logits, dim=1).float() / sampling["temperature"]
            logprobs = scaled.log_softmax(dim=-1).gather(2, tokens[..., None]).squeeze(2)
        return tokens, lengths, finished, logprobs


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    do_sample: bool = True,
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    return_logprobs: bool = False,
    engine: str = "auto",
) -> Rollout:
    """Sample up to ``max_new_tokens`` per prompt from ``model`` (a transformers causal LM).

    ``prompt_ids``: token lists of any lengths, or a left-padded ``[B, P]`` tensor with its
    ``attention_mask`` (all ones when omitted). A row stops at its first token in ``eos_token_id`` (None:
    rows run to ``max_new_tokens``); the loop stops once every row has. ``top_k=0`` and ``top_p=1`` disable
    those filters; ``do_sample=False`` is greedy. A fixed ``generator`` (on the model's device) makes
    sampling reproducible. ``return_logprobs`` fills ``Rollout.logprobs``. ``engine``: ``auto``, ``eager``,
    ``cuda_graph`` or ``hf`` (see the module docstring). The model runs in eval mode without gradients and
    gets its modes back afterwards.

    One-shot: a `RolloutEngine` kept across calls reuses its KV cache and captured CUDA graph.
    """
    return RolloutEngine(model, engine).generate(
        prompt_ids,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        do_sample=do_sample,
        generator=generator,
        attention_mask=attention_mask,
        return_logprobs=return_logprobs,
    )


# -- argument handling ---------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_sampling(max_new_tokens, temperature, top_p, top_k, pad_token_id, vocab, generator, device) -> None:
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
    if not _is_int(pad_token_id) or not (0 <= pad_token_id < vocab):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    if generator is not None and torch.device(generator.device).type != device.type:
        raise ValueError(
            f"generator is on {generator.device}, but the model is on {device}; it must be on the same device type"
        )


def _eos_list(eos_token_id, vocab: int) -> list[int]:
    eos = [] if eos_token_id is None else [eos_token_id] if _is_int(eos_token_id) else list(eos_token_id)
    if not all(_is_int(e) and 0 <= e < vocab for e in eos):
        raise ValueError(
            f"eos_token_id must be None, a token id or a list of token ids in [0, {vocab}), got {eos_token_id!r}"
        )
    return eos


def _prompt_batch(prompt_ids, attention_mask, pad_token_id, vocab, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim != 2 or prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
            raise ValueError(f"prompt_ids must be a non-empty [B, P] tensor, got shape {tuple(prompt_ids.shape)}")
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype == torch.bool:
            raise ValueError(f"prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
        ids = prompt_ids.to(device=device, dtype=torch.long)
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            if attention_mask.shape != prompt_ids.shape:
                raise ValueError(
                    f"attention_mask must have the shape of prompt_ids {tuple(prompt_ids.shape)}, "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=device, dtype=torch.long)
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("attention_mask must hold only 0 and 1")
            if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
                raise ValueError("attention_mask must be left-padded (zeros before ones in every row)")
            if not bool(mask[:, -1].all()):
                raise ValueError("attention_mask: every prompt needs at least one token")
    else:
        if attention_mask is not None:
            raise ValueError("attention_mask is only taken with a tensor of prompt_ids")
        ids, mask = left_pad(prompt_ids, pad_token_id, device)
    real = ids[mask.bool()]
    if bool(((real < 0) | (real >= vocab)).any()):
        raise ValueError(f"prompt_ids: token ids must lie in [0, {vocab})")
    return ids, mask


def _assemble(ids, mask, tokens, lengths, finished, logprobs, pad) -> Rollout:
    width = max(int(lengths.max()), 1)
    tokens = tokens[:, :width]
    response_mask = torch.arange(width, device=tokens.device)[None, :] < lengths[:, None]
    attention_mask = torch.cat([mask, response_mask.long()], dim=1)
    if logprobs is not None:
        logprobs = logprobs[:, :width].masked_fill(~response_mask, 0.0)
    return Rollout(
        sequences=torch.cat([ids, tokens.masked_fill(~response_mask, pad)], dim=1),
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        prompt_len=ids.shape[1],
        response_mask=response_mask,
        response_lengths=lengths,
        finished=finished,
        logprobs=logprobs,
    )
