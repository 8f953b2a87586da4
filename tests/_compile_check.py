"""Run as a script, in a fresh interpreter: torch.compile(fullgraph=True) over every op, forward
and backward, eager and under CPU autocast, compared with the eager run. Prints "ok"."""
import torch

import dvpo_kernels as dk


def main():
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
        lp, ent = dk.linear_logprobs(hidden, weight, tgt, return_entropy=True)
        loss2, _ = dk.policy_loss(lp, old, adv, mask, entropy=ent, entropy_coef=0.01)
        vals = dk.value_head(hidden, vw, 0.5)
        white = dk.masked_whiten(vals.detach(), mask)
        adv2, _ = dk.gae(white, vals.detach(), mask)
        loss3, _ = dk.dvpo_loss(hidden, weight, tgt, old, mask, gvm, vw, 0.1)
        return loss + loss2 + loss3 + 0.1 * (vals * adv2).sum(), metrics["clipfrac"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss_c, _ = compiled(hidden, weight)
            loss_e, _ = step(hidden, weight)
        grads_c = torch.autograd.grad(loss_c, (hidden, weight))
        grads_e = torch.autograd.grad(loss_e, (hidden, weight))
        torch.testing.assert_close(loss_c, loss_e)
        for gc, ge in zip(grads_c, grads_e):
            assert gc.dtype == torch.float32
            torch.testing.assert_close(gc, ge)
    print("ok")


if __name__ == "__main__":
    main()
