"""AdaGC's update against the paper's rule written out in float64, and against pytorch-optimizer's ``AdaGC``.

The equality with pytorch-optimizer maps its parameters: its ``AdaGC(lr, betas, beta, lambda_abs, lambda_rel,
warmup_steps=w + 1, weight_decay, eps)`` is ``torch.optim.AdamW(lr, betas, eps, weight_decay)`` stepping on
gradients clipped by our update with ``warmup_steps=w`` (it counts steps from 1 and clips globally while
``step < warmup_steps``). Its Adam part is torch's AdamW to the operation (decoupled decay ``p *= 1 - lr * wd``
first, ``lerp`` of the first moment, ``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``); its epsilons in the
clipping (added to the global norm, flooring ``gamma`` and the norms) are below float32 rounding here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradclip_plugin.functional import scale_, tensor_norms
from gradclip_plugin.functional.adaptive import adagc_update

INF, NAN = float("inf"), float("nan")


def paper_adagc(norms_per_step: list[list[float]], warmup_steps: int, lambda_abs: float, lambda_rel: float, beta: float):
    """Wang et al. 2025, Algorithm 1, on per-tensor norms, in Python floats: ``(coefficients, gammas)`` per step."""
    gamma: list[float] = [INF] * len(norms_per_step[0])
    out = []
    for t, norms in enumerate(norms_per_step):
        if t < warmup_steps:
            total = math.sqrt(sum(n * n for n in norms))
            h = min(1.0, lambda_abs / total) if total else 1.0
            coefs = [h] * len(norms)
            gamma = [min(g, h * n) for g, n in zip(gamma, norms)]
        else:
            coefs = [min(1.0, lambda_rel * g / n) if n else 1.0 for g, n in zip(gamma, norms)]
            gamma = [beta * g + (1 - beta) * c * n for g, c, n in zip(gamma, coefs, norms)]
        out.append((coefs, list(gamma)))
    return out


def run_update(norms_per_step, warmup_steps, **kwargs):
    gamma = torch.full((len(norms_per_step[0]),), INF)
    out = []
    for t, norms in enumerate(norms_per_step):
        gamma, coefs, _ = adagc_update(gamma, torch.tensor(norms), warmup=t < warmup_steps, **kwargs)
        out.append((coefs.tolist(), gamma.tolist()))
    return out


NORMS = [[3.0, 4.0, 0.5], [1.0, 2.0, 0.2], [6.0, 0.5, 0.3], [0.2, 5.0, 0.1], [0.3, 0.4, 0.1], [9.0, 0.1, 0.4],
         [0.25, 0.3, 0.2], [0.1, 0.2, 0.3]]  # fmt: skip


@pytest.mark.parametrize("warmup_steps", [1, 3, 5])
@pytest.mark.parametrize("lambda_abs,lambda_rel,beta", [(1.0, 1.05, 0.98), (2.5, 1.5, 0.5), (0.1, 1.0, 0.0)])
def test_each_step_equals_the_papers_rule(warmup_steps, lambda_abs, lambda_rel, beta):
    got = run_update(NORMS, warmup_steps, lambda_abs=lambda_abs, lambda_rel=lambda_rel, beta=beta)
    want = paper_adagc(NORMS, warmup_steps, lambda_abs, lambda_rel, beta)
    for t, ((coefs, gamma), (coefs_ref, gamma_ref)) in enumerate(zip(got, want)):
        assert coefs == pytest.approx(coefs_ref, rel=1e-6), t
        assert gamma == pytest.approx(gamma_ref, rel=1e-6), t
    assert any(c < 1 for coefs, _ in got[:warmup_steps] for c in coefs)  # the warm-up clips
    assert any(c < 1 for coefs, _ in got[warmup_steps:] for c in coefs)  # and after it


def test_warm_up_clips_globally_and_keeps_the_smallest_clipped_norm():
    gamma, coefs, limits = adagc_update(torch.full((2,), INF), torch.tensor([3.0, 4.0]), warmup=True, lambda_abs=1.0)
    assert coefs.tolist() == pytest.approx([0.2, 0.2]) and gamma.tolist() == pytest.approx([0.6, 0.8])
    assert torch.isinf(limits).all()
    gamma, coefs, _ = adagc_update(gamma, torch.tensor([0.3, 0.9]), warmup=True, lambda_abs=1.0)
    assert coefs.tolist() == [1.0, 1.0]  # the total, 0.95, is under lambda_abs: exactly 1
    assert gamma.tolist() == pytest.approx([0.3, 0.8])


def test_after_warm_up_each_tensor_is_held_to_lambda_rel_gamma():
    gamma = torch.tensor([1.0, 2.0, 0.5])
    norms = torch.tensor([10.0, 2.1, 0.1])
    new, coefs, limits = adagc_update(gamma, norms, warmup=False, lambda_rel=1.05, beta=0.9)
    assert limits.tolist() == pytest.approx([1.05, 2.1, 0.525])
    assert coefs.tolist() == pytest.approx([0.105, 1.0, 1.0])  # 2.1 is at its limit: not clipped
    assert (norms * coefs <= limits * (1 + 1e-6)).all()  # never above the limit
    assert new.tolist() == pytest.approx([0.9 * 1.0 + 0.1 * 1.05, 0.9 * 2.0 + 0.1 * 2.1, 0.9 * 0.5 + 0.1 * 0.1])


@pytest.mark.parametrize("bad", [NAN, INF])
@pytest.mark.parametrize("warmup", [True, False])
def test_a_nonfinite_norm_leaves_every_gamma_as_it_was(bad, warmup):
    gamma = torch.tensor([1.0, 2.0, 0.5])
    new, _, _ = adagc_update(gamma, torch.tensor([0.5, bad, 0.1]), warmup=warmup)
    assert torch.equal(new, gamma)


def test_a_skipped_step_leaves_gamma_and_has_coefficient_one():
    # on the device-skip path the base zeroes the norms where the step is skipped
    gamma = torch.tensor([1.0, 2.0])
    for warmup in (True, False):
        new, coefs, _ = adagc_update(gamma, torch.zeros(2), warmup=warmup, skip=torch.tensor(True))
        assert torch.equal(new, gamma) and coefs.tolist() == [1.0, 1.0]
    new, _, _ = adagc_update(gamma, torch.tensor([3.0, 1.0]), warmup=False, skip=torch.tensor(False))
    assert not torch.equal(new, gamma)


def test_zero_norms_and_zero_gamma_give_coefficient_one_not_nan():
    gamma, coefs, _ = adagc_update(torch.tensor([INF, INF]), torch.zeros(2), warmup=True)
    assert coefs.tolist() == [1.0, 1.0] and gamma.tolist() == [0.0, 0.0]
    gamma, coefs, _ = adagc_update(gamma, torch.tensor([0.0, 1.0]), warmup=False)
    assert coefs.tolist() == [1.0, 0.0]  # gamma 0: the paper's rule zeroes the tensor (documented)
    assert gamma.tolist() == [0.0, 0.0]


def test_a_tensor_never_measured_in_warm_up_is_clipped_globally_until_it_has_a_gamma():
    gamma = torch.tensor([1.0, INF])
    new, coefs, _ = adagc_update(gamma, torch.tensor([0.6, 0.8]), warmup=False, lambda_abs=0.5, lambda_rel=1.05, beta=0.9)
    assert coefs.tolist() == pytest.approx([1.0, 0.5])  # the first by its gamma, the second by the global rule
    assert new.tolist() == pytest.approx([0.9 + 0.1 * 0.6, 0.4])


@pytest.mark.parametrize("name,value", [("lambda_abs", 0.0), ("lambda_rel", -1.0)])
def test_thresholds_are_validated(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        adagc_update(torch.ones(1), torch.ones(1), warmup=True, **{name: value})


# ---------------------------------------------------------------------------------------------- pytorch-optimizer
class Net(nn.Module):
    """Several tensors of different sizes, so that per-tensor clipping differs from global clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


def batches(steps: int):
    """Large gradients in warm-up (clipped globally), small ones after it but for a spike in ``b.bias`` at step 5."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g) * 5, torch.randn(8, 3, generator=g) * 5, 1.0 if t < 3 else 0.01, 30.0 * (t == 5))
            for t in range(steps)]  # fmt: skip


def loss_of(model, batch):
    x, y, scale, spike = batch
    return nn.functional.mse_loss(model(x), y) * scale + spike * model.b.bias.sum()


@pytest.mark.parametrize("ref_foreach", [False, None], ids=["reference-loop", "reference-foreach"])
def test_adamw_after_the_update_equals_pytorch_optimizers_adagc(ref_foreach):
    adagc = pytest.importorskip("pytorch_optimizer").AdaGC
    warmup, steps = 3, 8
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    clip = dict(lambda_abs=1.0, lambda_rel=1.05, beta=0.9)
    torch.manual_seed(0)
    ours, ref = Net(), Net()
    ref.load_state_dict(ours.state_dict())
    opt = torch.optim.AdamW(ours.parameters(), foreach=False, **hp)
    ref_opt = adagc(ref.parameters(), warmup_steps=warmup + 1, foreach=ref_foreach, **hp, **clip)
    gamma = torch.full((len(list(ours.parameters())),), INF)
    clipped = []
    for t, batch in enumerate(batches(steps)):
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_of(model, batch).backward()
        grads = [p.grad for p in ours.parameters()]
        gamma, coefs, _ = adagc_update(gamma, tensor_norms(grads), warmup=t < warmup, **clip)
        scale_(grads, coefs)
        clipped.append(coefs < 1)
        opt.step()
        ref_opt.step()
        for i, ((n, p), q) in enumerate(zip(ours.named_parameters(), ref.parameters())):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {t}, {n}: {m}")
            torch.testing.assert_close(gamma[i], ref_opt.state[q]["gamma"].reshape(()), rtol=1e-5, atol=1e-7)
    assert all(c.all() for c in clipped[:warmup])  # global clipping in warm-up
    assert any(c.any() and not c.all() for c in clipped[warmup:])  # per-tensor clipping after
