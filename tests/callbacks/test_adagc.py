"""AdaGC in a real Trainer and in a plain loop: against pytorch-optimizer's ``AdaGC``, against the paper's rule
on probed gradients for several optimizers, its state in checkpoints, its metrics and its host reads.

The model and the gradients come from ``tests/functional/test_adagc.py``: large gradients during the
warm-up (clipped globally), small ones after it, but for a spike in one tensor (clipped alone).
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch import nn

if __name__ == "__main__":  # run as a process of the gloo pair: the tests' own imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from functional.test_adagc import Net, batches, loss_of, paper_adagc
from gradclip_plugin import AdaGC
from helpers import GradProbe, make_loader, make_trainer

REPO = Path(__file__).resolve().parents[2]
WARMUP, STEPS = 3, 8
CLIP = dict(lambda_abs=1.0, lambda_rel=1.05, beta=0.9)
ADAM = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def muon_and_adamw(module: nn.Module) -> list[torch.optim.Optimizer]:
    matrices = [p for p in module.parameters() if p.dim() == 2]
    return [torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW([p for p in module.parameters() if p.dim() != 2])]


OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), foreach=False, **ADAM),
    "adamw-fused": lambda m: torch.optim.AdamW(m.parameters(), fused=True, **ADAM),  # clip_ on the device-skip path
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.01),
    "sgd-momentum-foreach": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True),
    "muon": muon_and_adamw,
}


class AdaGCModel(pl.LightningModule):
    """``Net`` on the fixed batches of ``functional/test_adagc.py``, one per step (the loader's batch is ignored).
    With Muon (for the matrices) and AdamW (for the rest), it steps both by manual optimization."""

    def __init__(self, optimizer: str = "adamw", nan_at: int = -1) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights whatever ran before
            torch.manual_seed(0)
            self.net = Net()
        self.optimizer, self.nan_at, self.batches = optimizer, nan_at, batches(STEPS)
        self.automatic_optimization = optimizer != "muon"

    def training_step(self, batch, batch_idx):
        t = self.global_step // len(self.trainer.optimizers)
        loss = loss_of(self.net, self.batches[t]) * (math.nan if t == self.nan_at else 1.0)
        if self.automatic_optimization:
            return loss
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self)


class Weights(pl.Callback):
    """The weights after each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


class Gammas(pl.Callback):
    """AdaGC's saved ``gamma`` after each step (read through its checkpoint state)."""

    def __init__(self, cb: AdaGC) -> None:
        self.cb, self.steps = cb, []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.steps.append(self.cb.state_dict()["gamma"].get(0, {}))  # optimizer 0's, by parameter name


def fit(tmp_path, cb: AdaGC, model: AdaGCModel, *more: pl.Callback, steps: int = STEPS, ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [*more[:1], cb, *more[1:]], max_steps=steps, **kwargs)
    trainer.fit(model, make_loader(n=STEPS, batch_size=1), ckpt_path=ckpt_path)
    return trainer


def test_trainer_with_adamw_equals_pytorch_optimizers_adagc(tmp_path):
    # its warmup_steps counts from 1 and clips while step < warmup_steps: ours + 1 (see the class docstring)
    reference = pytest.importorskip("pytorch_optimizer").AdaGC
    weights = Weights()
    torch.manual_seed(0)
    model = AdaGCModel()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(tmp_path, AdaGC(warmup_steps=WARMUP, **CLIP), model, weights)

    ref = Net()
    ref.load_state_dict({n.removeprefix("net."): p for n, p in start.items()})
    opt = reference(ref.parameters(), warmup_steps=WARMUP + 1, **ADAM, **CLIP)
    for t, batch in enumerate(batches(STEPS)):
        opt.zero_grad()
        loss_of(ref, batch).backward()
        opt.step()
        for n, p in ref.named_parameters():
            torch.testing.assert_close(weights.steps[t][f"net.{n}"], p.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"step {t}, {n}: {m}")


def expected_after(cb: AdaGC, before: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The paper's rule (float64) on the probed pre-clip gradients: the gradients the optimizer must get."""
    norms = [[torch.linalg.vector_norm(g.double()).item() for g in step.values()] for step in before]
    rule = paper_adagc(norms, cb.warmup_steps, cb.lambda_abs, cb.lambda_rel, cb.beta)
    return [{n: g.double() * c for (n, g), c in zip(step.items(), coefs)} for step, (coefs, _) in zip(before, rule)]


@pytest.mark.parametrize("optimizer", [k for k in OPTIMIZERS if k != "muon" or hasattr(torch.optim, "Muon")])
def test_each_optimizer_gets_the_gradients_the_papers_rule_gives(tmp_path, optimizer):
    cb = AdaGC(warmup_steps=WARMUP, **CLIP)
    before, after = GradProbe(), GradProbe()
    n_opt = 2 if optimizer == "muon" else 1
    fit(tmp_path, cb, AdaGCModel(optimizer), before, after, steps=STEPS * n_opt)
    for i in range(n_opt):  # each optimizer counts its own steps; gamma is per parameter name
        steps_before = [s for s, o in zip(before.steps, before.optimizers) if o == i]
        steps_after = [s for s, o in zip(after.steps, after.optimizers) if o == i]
        assert len(steps_before) == STEPS
        for t, (got, want) in enumerate(zip(steps_after, expected_after(cb, steps_before))):
            for n, g in got.items():
                torch.testing.assert_close(g.double(), want[n], rtol=1e-5, atol=1e-9, msg=lambda m: f"step {t}, {n}: {m}")
    gamma = cb.state_dict()["gamma"]  # per optimizer, by parameter name
    assert sorted(n for i in range(n_opt) for n in gamma[i]) == sorted(n for n, _ in AdaGCModel().named_parameters())


@pytest.mark.parametrize("optimizer,nonfinite", [("adamw-fused", "skip"), ("sgd", "skip"), ("sgd", "ignore")],
                         ids=["device-skip", "host-skip", "ignore"])  # fmt: skip
@pytest.mark.parametrize("nan_at", [1, 5], ids=["warm-up", "after"])
def test_a_nonfinite_step_leaves_gamma_as_it_was(tmp_path, optimizer, nonfinite, nan_at):
    cb = AdaGC(warmup_steps=WARMUP, nonfinite=nonfinite, **CLIP)
    gammas = Gammas(cb)
    with pytest.warns(UserWarning, match="non-finite") if nonfinite == "skip" else _no_warning():
        fit(tmp_path, cb, AdaGCModel(optimizer, nan_at=nan_at), gammas)
    assert gammas.steps[nan_at] == gammas.steps[nan_at - 1]
    assert all(math.isfinite(v) for v in gammas.steps[-1].values())
    # a step skipped on the host is not counted; one skipped on the device or ignored is
    assert cb.state_dict()["steps"] == {0: STEPS - (optimizer == "sgd" and nonfinite == "skip")}


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def test_resumed_run_clips_exactly_as_the_uninterrupted_run(tmp_path):
    full = GradProbe()
    fit(tmp_path / "full", AdaGC(warmup_steps=WARMUP, **CLIP), AdaGCModel("sgd"), GradProbe(), full)
    trainer = fit(tmp_path / "first", AdaGC(warmup_steps=WARMUP, **CLIP), AdaGCModel("sgd"), steps=5)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    cb, resumed = AdaGC(warmup_steps=WARMUP, lambda_rel=2.0), GradProbe()  # a changed threshold keeps the state
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]["AdaGC{'log_prefix': 'grad_clip'}"]
    assert sorted(saved["gamma"][0]) == ["net.a.bias", "net.a.weight", "net.b.bias", "net.b.weight", "net.norm.bias", "net.norm.weight"]
    assert saved["steps"] == {0: 5}
    cb.lambda_rel = CLIP["lambda_rel"]
    fit(tmp_path / "resumed", cb, AdaGCModel("sgd"), GradProbe(), resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert len(resumed.steps) == STEPS - 5
    for t, step in enumerate(resumed.steps, start=5):
        for n, g in step.items():
            assert torch.equal(g, full.steps[t][n]), f"step {t}, {n}"
    # the comparison can fail: without the saved state the same resume clips differently
    ckpt = torch.load(tmp_path / "mid.ckpt", weights_only=False)
    del ckpt["callbacks"]["AdaGC{'log_prefix': 'grad_clip'}"]
    torch.save(ckpt, tmp_path / "stateless.ckpt")
    fresh = GradProbe()
    fit(tmp_path / "fresh", AdaGC(warmup_steps=WARMUP, **CLIP), AdaGCModel("sgd"), GradProbe(), fresh, ckpt_path=tmp_path / "stateless.ckpt")
    assert any(not torch.equal(g, full.steps[t][n]) for t, step in enumerate(fresh.steps, start=5) for n, g in step.items())


def test_a_saved_state_that_does_not_fit_is_warned_about_and_started_afresh():
    cb = AdaGC()
    with pytest.warns(UserWarning, match="start afresh"):
        cb.load_state_dict({"gamma": {"a.weight": "high"}, "steps": {0: 3}})
    assert cb.state_dict()["gamma"] == {} and cb.state_dict()["steps"] == {}


def test_plain_loop_metrics_count_the_clipped_tensors():
    torch.manual_seed(0)
    model, cb = Net(), AdaGC(warmup_steps=WARMUP, **CLIP)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    counts, thresholds, norms = [], [], []
    for batch in batches(STEPS):
        opt.zero_grad()
        loss_of(model, batch).backward()
        norms.append([torch.linalg.vector_norm(p.grad.double()).item() for p in model.parameters()])
        metrics = cb.clip_gradients(model, opt)
        counts.append(metrics["grad_clip/clipped_tensors"])
        thresholds.append(metrics["grad_clip/threshold"])
        opt.step()
    rule = paper_adagc(norms, WARMUP, CLIP["lambda_abs"], CLIP["lambda_rel"], CLIP["beta"])
    assert counts == [sum(c < 1 - 1e-9 for c in coefs) for coefs, _ in rule]
    assert counts[:WARMUP] == [6] * WARMUP and 0 < counts[5] < 6  # global clipping, then the spike alone
    assert thresholds[:WARMUP] == [CLIP["lambda_abs"]] * WARMUP
    for t in range(WARMUP, STEPS):  # then the global norm of the limits lambda_rel * gamma
        limits = [CLIP["lambda_rel"] * g for g in rule[t - 1][1]]
        assert thresholds[t] == pytest.approx(math.sqrt(sum(x * x for x in limits)), rel=1e-6)


@pytest.mark.parametrize("optimizer,nonfinite", [("sgd", "ignore"), ("adamw-fused", "skip")])
def test_reads_nothing_to_the_host_on_steps_that_do_not_log(tmp_path, monkeypatch, optimizer, nonfinite):
    from test_no_sync import HostReadCounter, watch_hooks

    counter = HostReadCounter(monkeypatch)
    cb = AdaGC(warmup_steps=WARMUP, nonfinite=nonfinite, **CLIP)
    calls = watch_hooks(counter, cb)
    fit(tmp_path, cb, AdaGCModel(optimizer), log_every_n_steps=1000)
    assert calls["on_before_optimizer_step"] == STEPS and counter.counts == Counter()


BAD_ARGS = [
    (dict(lambda_abs=0.0), "lambda_abs"),
    (dict(lambda_abs=math.inf), "lambda_abs"),
    (dict(lambda_rel=-1.0), "lambda_rel"),
    (dict(lambda_rel="1.05"), "lambda_rel"),
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(warmup_steps=0), "warmup_steps"),
    (dict(warmup_steps=2.0), "warmup_steps"),
    (dict(warmup_steps=True), "warmup_steps"),
    (dict(nonfinite="drop"), "nonfinite"),
    (dict(log_prefix=""), "log_prefix"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGS, ids=[f"{n}-{v!r}" for (k, n) in BAD_ARGS for v in k.values()])
def test_every_init_argument_is_validated(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        AdaGC(**kwargs)


def test_numbers_are_read_once_from_numpy_and_tensors():
    cb = AdaGC(lambda_abs=torch.tensor(2.0), beta=torch.tensor(0.5), warmup_steps=torch.tensor(7))
    assert (cb.lambda_abs, cb.beta, cb.warmup_steps) == (2.0, 0.5, 7) and type(cb.warmup_steps) is int


def test_example_config_builds_the_callback(tmp_path):
    pytest.importorskip("jsonargparse")
    from callbacks.test_adaptive import load_example_train

    path = REPO / "examples" / "configs" / "adagc.yaml"
    raw = yaml.safe_load(path.read_text())
    assert [e["class_path"] for e in raw["trainer"]["callbacks"]] == ["gradclip_plugin.AdaGC"]
    cli = load_example_train().main(["--config", str(path), f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"], run=False)
    (cb,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, AdaGC)]
    assert (cb.lambda_abs, cb.lambda_rel, cb.beta, cb.warmup_steps, cb.nonfinite) == (1.0, 1.05, 0.98, 100, "skip")


# ---------------------------------------------------------------------------------------------- DTensor, 2 processes
def sharded_run(out_dir: Path) -> None:
    """One rank: AdaGC on DTensor shards (even, uneven, empty, replicated) and on the full tensors, 5 steps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from test_distributed import _init_pair, clip_once

    rank = _init_pair()
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g), torch.randn(1, 6, generator=g), torch.randn(7, 3, generator=g)]
    placements = [[Shard(0)], [Shard(0)], [Shard(0)], [Replicate()]]  # (1, 6) leaves rank 1 an empty shard
    sharded_cb, full_cb = AdaGC(warmup_steps=2, **CLIP), AdaGC(warmup_steps=2, **CLIP)
    res: dict = {"sharded": [], "full": []}
    for t, scale in enumerate([3.0, 2.0, 0.1, 0.1, 0.12]):
        grads = [x * scale * (20.0 if (t, i) == (3, 1) else 1.0) for i, x in enumerate(full)]  # a spike in one tensor
        shards = [distribute_tensor(x.clone(), mesh, p) for x, p in zip(grads, placements)]
        stats = clip_once(sharded_cb, shards)
        res["sharded"].append(([s.full_tensor() for s in shards], stats.extra["clipped_tensors"], sharded_cb.state_dict()["gamma"]))
        plain = [x.clone() for x in grads]
        stats = clip_once(full_cb, plain)
        res["full"].append((plain, stats.extra["clipped_tensors"], full_cb.state_dict()["gamma"]))
    torch.save(res, out_dir / f"adagc_rank{rank}.pt")


def test_dtensor_shards_clip_as_the_full_tensors(tmp_path):
    from test_distributed import _clean_env, _wait

    import subprocess

    env = {**_clean_env(), "GRADCLIP_STORE": str(tmp_path / "store")}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path)], env={**env, "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) for r in range(2)]  # fmt: skip
    _wait(procs, "AdaGC on DTensors")
    for rank in range(2):
        res = torch.load(tmp_path / f"adagc_rank{rank}.pt", weights_only=False)
        for t, ((grads, count, gamma), (grads_ref, count_ref, gamma_ref)) in enumerate(zip(res["sharded"], res["full"])):
            for a, b in zip(grads, grads_ref):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"rank {rank}, step {t}: {m}")
            assert count == count_ref and gamma.keys() == gamma_ref.keys()
            assert all(gamma[i] == pytest.approx(gamma_ref[i], rel=1e-6) for i in gamma)
        assert res["full"][3][1] == 1 and res["full"][0][1] == 4  # one tensor clipped alone; all in warm-up


if __name__ == "__main__":
    sharded_run(Path(sys.argv[1]))
