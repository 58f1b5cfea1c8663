"""``clip_gradients`` and ``gradient_norms`` in loops without a Trainer: Lightning Fabric and plain PyTorch.

Every test captures the gradients before the call and checks what the optimizer receives against
the rule's formula on them (float64), and the returned metrics against the same numbers. Fabric
DDP on 2 CPU processes is in ``tests/test_distributed.py``.
"""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gradclip_plugin import AutoClip, ClipByGlobalNorm, ClipByValue, GradientNormMonitor

ROOT = Path(__file__).resolve().parents[1]
fabric_module = pytest.importorskip("lightning.fabric")


def model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(4, 8, generator=g) * 10, torch.randn(4, 1, generator=g) * 10) for _ in range(4)]
    return model, batches


def norm64(grads) -> float:
    return torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads])).item()


def make_fabric(precision: str):
    from lightning.fabric.plugins.precision import MixedPrecision

    if precision == "16-mixed":  # fp16 AMP with a loss scaler, on CPU
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return fabric_module.Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    return fabric_module.Fabric(accelerator="cpu", devices=1, precision=precision)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_fabric_clip_gradients_equals_the_formula_and_returns_the_trainers_metrics(precision):
    fabric = make_fabric(precision)
    model, batches = model_and_data()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    clip = ClipByGlobalNorm(5.0)
    for x, y in batches:
        fabric.backward(nn.functional.mse_loss(model(x), y))
        scaler = getattr(fabric.strategy.precision, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else 1.0
        before = [p.grad.double() / scale for p in model.parameters()]  # the true gradients
        metrics = clip.clip_gradients(model, opt, fabric=fabric)
        norm = norm64(before)
        coef = min(1.0, 5.0 / norm)
        assert coef < 1
        for p, g in zip(model.parameters(), before):
            torch.testing.assert_close(p.grad.double(), g * coef, rtol=1e-5, atol=1e-7)
        assert set(metrics) == {f"grad_clip/{k}" for k in ("norm", "norm_max", "norm_clipped", "threshold", "clip_rate", "nonfinite_steps")}
        assert metrics["grad_clip/norm"] == pytest.approx(norm, rel=1e-5)
        assert metrics["grad_clip/norm_clipped"] == pytest.approx(5.0, rel=1e-6)
        assert (metrics["grad_clip/clip_rate"], metrics["grad_clip/nonfinite_steps"]) == (1.0, 0.0)
        opt.step()  # under the scaler: the gradients are unscaled once, the step is not skipped
        opt.zero_grad()
    if precision == "16-mixed":
        assert fabric.strategy.precision.scaler.get_scale() == 2.0**10  # no overflow was mistaken


def test_fabric_skip_leaves_weights_and_adam_state_untouched_and_an_overflow_to_the_scaler():
    fabric = make_fabric("32-true")
    model, batches = model_and_data()
    model, opt = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.01))
    clip = ClipByValue(1.0)
    with pytest.warns(UserWarning, match="skipping the optimizer step"):
        for i, (x, y) in enumerate(batches):
            before = [p.detach().clone() for p in model.parameters()]
            loss = nn.functional.mse_loss(model(x), y)
            fabric.backward(loss * math.inf if i == 1 else loss)
            metrics = clip.clip_gradients(model, opt, fabric=fabric, metrics=i == 3)
            opt.step()
            opt.zero_grad()
            moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
            assert not any(moved) if i == 1 else all(moved)
    assert {int(s["step"]) for s in opt.optimizer.state.values()} == {3}
    assert metrics["grad_clip/nonfinite_steps"] == 1.0
    assert metrics["grad_clip/clip_rate"] == 1.0  # over the 3 finite steps since metrics were last returned


def test_fabric_monitor_gives_the_norms_of_the_gradients():
    fabric = make_fabric("32-true")
    model, batches = model_and_data()
    model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = batches[0]
    fabric.backward(nn.functional.mse_loss(model(x), y))
    norms = GradientNormMonitor(group_depth=1).gradient_norms(model, opt, fabric=fabric)
    params = dict(model.module.named_parameters())
    assert norms["grad_norm/total"] == pytest.approx(norm64(p.grad for p in params.values()), rel=1e-6)
    assert norms["grad_norm/0"] == pytest.approx(norm64([params["0.weight"].grad, params["0.bias"].grad]), rel=1e-6)
    assert set(norms) == {"grad_norm/total", "grad_norm/total_max", "grad_norm/0", "grad_norm/2", "grad_norm/nonfinite_steps"}


def run_loop(batches, model, clip, start: int = 0):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    after = []
    for x, y in batches[start:]:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        clip.clip_gradients(model, opt, metrics=False)
        after.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return after


def test_a_plain_pytorch_loop_clips_and_resumes_from_the_saved_state_exactly():
    model, batches = model_and_data()
    clip = AutoClip(percentile=50.0)
    full = run_loop(batches, model, clip)
    # AutoClip's own reference: the percentile of the norms seen so far, this one included
    model, batches = model_and_data()
    first = AutoClip(percentile=50.0)
    run_loop(batches[:2], model, first)
    saved = {"model": model.state_dict(), "clip": first.state_dict()}  # the user's own checkpoint
    model, batches = model_and_data()
    model.load_state_dict(saved["model"])
    resumed = AutoClip(percentile=50.0)
    resumed.load_state_dict(saved["clip"])
    rest = run_loop(batches, model, resumed, start=2)
    for a, b in zip(rest, full[2:]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(resumed._states[0].history) == 4


def test_the_torch_habit_of_passing_parameters_works_in_a_plain_loop():
    model, batches = model_and_data()
    x, y = batches[0]
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.grad.double() for p in model.parameters()]
    weights = [p.detach().clone() for p in model.parameters()]
    ClipByGlobalNorm(1.0).clip_gradients(model, torch.optim.SGD(model.parameters(), lr=0.1))
    coef = 1.0 / norm64(before)
    for p, g, w in zip(model.parameters(), before, weights):
        torch.testing.assert_close(p.grad.double(), g * coef)
        assert torch.equal(p.detach(), w)


def test_a_plain_loop_with_its_own_grad_scaler_and_a_fused_optimizer_skips_on_the_host():
    # the callback cannot see the loop's GradScaler, whose step() would overwrite a `found_inf`: in a plain
    # loop the skip is decided on the host (one read), and the scaler's step and update go on as usual
    model, batches = model_and_data()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    clip = ClipByGlobalNorm(1.0, skip_above=1e4)
    for k, (x, y) in enumerate(batches):
        loss = nn.functional.mse_loss(model(x), y) * (1e6 if k == 2 else 1.0)  # a spike at step 2
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        metrics = clip.clip_gradients(model, optimizer)
        weights = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters())) == (k == 2), k
        assert metrics["grad_clip/skipped_steps"] == (k >= 2)
    assert {int(s["step"]) for s in optimizer.state.values()} == {3}
    assert not hasattr(optimizer, "found_inf")


def test_the_fabric_example_runs_and_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fabric_train.py", "--steps", "150"])
    monkeypatch.chdir(tmp_path)  # its logs land here
    runpy.run_path(str(ROOT / "examples" / "fabric_train.py"), run_name="__main__")
    out = capsys.readouterr().out
    loss = float(out.split("final validation loss")[1].split()[0])
    assert math.isfinite(loss) and loss < 1.5, out
