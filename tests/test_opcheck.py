"""The torch.library layer: ``torch.library.opcheck`` on every op and backend (schema, autograd
registration, fake kernels against the real outputs' shapes and strides, AOT dispatch with
dynamic shapes), on transposed and non-contiguous inputs; and the CUDA-graph tags: an op is
tagged ``cudagraph_unsafe`` exactly when some backend of it syncs the host.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dvpo_kernels as dk
from dvpo_kernels import _backends
from dvpo_kernels._params import LossParams

N, H, V, B, T = 13, 24, 37, 3, 7
LOSS = tuple(LossParams(0.2, 0.28, 3.0, 0.05, "k3", 0.01))
DVPO = torch.ops.dvpo


def _available(backend):
    why = _backends.why_not(backend, "value_head" if backend == "native" else "linear_logprobs",
                            torch.device("cpu"))
    if why is not None:
        pytest.skip(f"the {backend} backend cannot run here: {why}")
    return backend


def _odd_layouts(seed=0, grad=False):
    """hidden with a row stride of 2H (a slice), weight as the transpose of an [H, V] tensor."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, 2 * H, generator=g)[:, ::2]
    weight = (torch.randn(H, V, generator=g) / H ** 0.5).t()
    bias = torch.randn(2 * V, generator=g)[::2]
    assert not (hidden.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    if grad:
        for t in (hidden, weight, bias):
            t.requires_grad_()
    tgt = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    per_token = torch.randn(N, 3, generator=g)  # old log-probs, advantages, ref: column views
    old, adv, ref = -per_token[:, 0].abs(), per_token[:, 1], -per_token[:, 2].abs()
    return hidden, weight, bias, tgt, mask, old, adv, ref


def _lm_cases(backend):
    hidden, weight, bias, tgt, mask, old, adv, ref = _odd_layouts(grad=True)
    w_tok = (mask.float() / mask.sum()).contiguous()
    lse = torch.randn(N)
    ent = torch.rand(N)
    cases = [
        (DVPO.linear_logprobs, (hidden, weight, tgt, bias, 0.7, True, "speed", backend)),
        (DVPO.fused_policy_loss, (hidden, weight, tgt, old, adv, w_tok, mask, ref, bias, *LOSS, 0.7, "speed",
                                  backend, 7)),
        (DVPO.fused_policy_loss, (hidden, weight, tgt, old, adv, w_tok, mask, None, None, *LOSS, 1.0, "lean",
                                  backend, 3)),
        (DVPO.policy_loss, (old.detach().clone().requires_grad_(), ent.clone().requires_grad_(), old, adv, w_tok,
                            mask, ref, *LOSS, backend)),
    ]
    plain = [t.detach() for t in (hidden, weight, bias)]
    cases.append((DVPO.linear_logprobs_backward,
                  (torch.randn(N), torch.randn(N), *plain[:2], tgt, plain[2], lse, ent, 0.7, "lean", backend, 7)))
    return cases


def _advantage_cases(backend):
    g = torch.Generator().manual_seed(1)
    gvm = torch.randn(B, T, 2 * H, generator=g)[..., ::2]
    vw = torch.randn(2 * H, generator=g)[::2]
    mask = torch.rand(B, T, generator=g) > 0.3
    old, ref = torch.randn(T, B, generator=g).t(), torch.randn(T, B, generator=g).t()
    values = torch.randn(B, T, generator=g)
    hidden = torch.randn(H, B * T, generator=g).t().requires_grad_()  # column-major
    return [
        (DVPO.value_head, (hidden, vw.clone().requires_grad_(), torch.tensor(0.3, requires_grad=True), backend)),
        (DVPO.gae, (values, torch.randn(B, T, generator=g), mask, 0.99, 0.9, backend)),
        (DVPO.masked_whiten, (values, mask, False, 1e-8, backend)),
        (DVPO.dvpo_advantages, (gvm, vw, torch.tensor(0.1), mask, old, ref, 0.05, torch.randn(B, generator=g),
                                1.0, 0.95, "seq", True, backend)),
    ]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_opcheck_lm_head_ops(backend):
    for op, args in _lm_cases(_available(backend)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_opcheck_advantage_ops(backend):
    for op, args in _advantage_cases(_available(backend)):
        torch.library.opcheck(op, args)


def test_fake_outputs_are_contiguous_for_transposed_weights():
    """What opcheck found: empty_like kept a transposed weight's strides in the fake dW."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    hidden, weight, bias, tgt, mask, old, adv, ref = _odd_layouts()
    with FakeTensorMode(allow_non_fake_inputs=True):
        _, dw, db = DVPO.linear_logprobs_backward(torch.randn(N), None, hidden, weight, tgt, bias,
                                                  torch.randn(N), torch.randn(N), 1.0, "speed", "torch", 7)
        outs = DVPO.fused_policy_loss(hidden, weight, tgt, old, adv, old, mask, ref, bias, *LOSS, 1.0, "speed",
                                      "torch", 7)
    for t in (dw, db) + tuple(outs):
        assert t.is_contiguous()


# --- CUDA graphs ---------------------------------------------------------------------------------

class _HostSyncs(TorchDispatchMode):
    """Records aten ops whose result the host must wait for (data-dependent shapes or values)."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tags = set(func.tags)
        if ({torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output} & tags
                or func is torch.ops.aten.is_nonzero.default):
            self.seen.add(str(func))
        return func(*args, **(kwargs or {}))


def _functional_calls(backend):
    hidden, weight, bias, tgt, mask, old, adv, ref = _odd_layouts(grad=True)
    g = torch.Generator().manual_seed(2)
    gvm, vw = torch.randn(B, T, H, generator=g), torch.randn(H, generator=g)
    m2 = torch.rand(B, T, generator=g) > 0.3
    vals = torch.randn(B, T, generator=g)

    def lp():
        out, ent = dk.linear_logprobs(hidden, weight, tgt, bias=bias, return_entropy=True, backend=backend)
        return (out.sum() + ent.sum()).backward()

    def fpl():
        dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, bias=bias, backend=backend)[0].backward()

    def pl():
        dk.policy_loss(old.clone().requires_grad_(), old, adv, mask, backend=backend)[0].backward()

    return {
        "linear_logprobs": lp, "fused_policy_loss": fpl, "policy_loss": pl,
        "value_head": lambda: dk.value_head(gvm, vw, 0.1, backend=backend),
        "gae": lambda: dk.gae(vals, vals, m2, backend=backend),
        "masked_whiten": lambda: dk.masked_whiten(vals, m2, backend=backend),
        "dvpo_advantages": lambda: dk.dvpo_advantages(gvm, vw, 0.1, m2, backend=backend),
    }


def _op_syncs(monkeypatch, backend):
    """op name -> host-syncing aten ops its backend implementation ran."""
    syncs = {}
    real_impl = _backends.impl

    def impl(name, op):
        fn = real_impl(name, op)

        def recorded(*args):
            with _HostSyncs() as mode:
                out = fn(*args)
            syncs.setdefault(op.removesuffix("_backward"), set()).update(mode.seen)
            return out
        return recorded

    monkeypatch.setattr(_backends, "impl", impl)
    for op, call in _functional_calls(backend).items():
        if _backends.why_not(backend, op, torch.device("cpu")) is None:
            call()
            syncs.setdefault(op, set())
    return syncs


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"), reason="this PyTorch has no cudagraph_unsafe tag")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton), "native"])
def test_exactly_the_host_syncing_ops_are_tagged_cudagraph_unsafe(monkeypatch, backend):
    if dk.backend_report(torch.device("cpu"))[backend] is not None:
        pytest.skip(f"the {backend} backend is not available here")
    syncs = _op_syncs(monkeypatch, backend)
    assert syncs
    for op, seen in syncs.items():
        tagged = torch.Tag.cudagraph_unsafe in getattr(DVPO, op).default.tags
        assert tagged == bool(seen), f"{op} on {backend}: tagged={tagged}, host syncs {sorted(seen)}"
