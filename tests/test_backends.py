import subprocess
import sys

import pytest
import torch

import dvpo_kernels as dk
from dvpo_kernels import _backends


def test_torch_backend_always_available_and_auto_on_cpu_never_picks_triton():
    assert dk.backend_report(torch.device("cpu"))["torch"] is None
    for op in ("linear_logprobs", "fused_policy_loss", "policy_loss"):
        assert _backends.resolve(op, "auto", torch.device("cpu")) != "triton"


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("DVPO_KERNELS_BACKEND", "torch")
    assert _backends.resolve("gae", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("DVPO_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DVPO_KERNELS_BACKEND"):
        dk.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2))


def test_forced_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delitem(_backends._loaded, "native", raising=False)
    monkeypatch.setitem(_backends._load_errors, "native", "ImportError: extension not built")
    with pytest.raises(RuntimeError, match="extension not built"):
        dk.gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), backend="native")


def test_cli_report_and_self_check():
    out = subprocess.run([sys.executable, "-m", "dvpo_kernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for op in ("linear_logprobs", "policy_loss", "fused_policy_loss", "value_head", "gae", "masked_whiten",
               "dvpo_advantages"):
        assert f"{op} " in out.stdout
    assert "all ops ok" in out.stdout and "torch " in out.stdout


def test_torch_compile_fullgraph():
    b, t, h, v = 2, 5, 16, 37
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    tgt = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    gvm = torch.randn(b, t, h, generator=g)
    vw = torch.randn(h, generator=g)

    def step(hidden, weight):
        old = dk.linear_logprobs(hidden.detach(), weight.detach(), tgt)
        adv, _, _ = dk.dvpo_advantages(gvm, vw, None, mask)
        loss, metrics = dk.fused_policy_loss(hidden, weight, tgt, old, adv, mask, entropy_coef=0.01)
        lp = dk.linear_logprobs(hidden, weight, tgt)
        loss2, _ = dk.policy_loss(lp, old, adv, mask)
        return loss + loss2, metrics["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, _ = compiled(hidden, weight)
    gh_c, gw_c = torch.autograd.grad(loss_c, (hidden, weight))
    loss_e, _ = step(hidden, weight)
    gh_e, gw_e = torch.autograd.grad(loss_e, (hidden, weight))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(gh_c, gh_e)
    torch.testing.assert_close(gw_c, gw_e)
