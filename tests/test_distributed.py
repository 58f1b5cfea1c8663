"""Distributed guarantees, each shown by 2 CPU processes over gloo, run as subprocesses.

* DTensor-sharded tensors (``Shard``/``Replicate`` placements, 1-D and 2-D meshes, uneven and empty
  shards): norms, clipped values and callback statistics equal those of the full tensors, on both
  ranks, with one all-reduce per shard group; a non-finite entry on one rank's shard makes the norm
  non-finite on both (NaN included, which gloo's MAX would drop).
* FSDP2 (``fully_shard``) on CPU, by hand and through Lightning's ``ModelParallelStrategy``: the
  callback clips the sharded gradients by the norm of the full, unsharded gradients.
* DDP (``Trainer(strategy="ddp")``): identical norms, clipped gradients, skip decisions and weights
  on both ranks, with a non-finite gradient injected on one rank only.
* Lightning's FSDP strategy (needs CUDA): the same check, skipped without CUDA.

This module is also the script the processes run: ``python test_distributed.py <scenario> <out_dir>``.
Each process saves what it measured to ``<out_dir>/<scenario>_rank<r>.pt``; the tests load both
files and compare them with references computed here on the full tensors.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

TIMEOUT_S = 240
NORM_TYPES = (1.0, 2.0, 3.0, math.inf)
MAX_NORM = 1.0  # global threshold: under every global norm of the test tensors
MAX_NORM_PER_TENSOR = 2.0  # per-tensor threshold: above some of their norms, under others
N_DTENSORS = 5  # full_tensors() "a".."e" are sharded or replicated, "f" stays a plain tensor
CLIP_VALUE = 0.5


# ---------------------------------------------------------------------------------------------
# launching
# ---------------------------------------------------------------------------------------------
def _clean_env() -> dict[str, str]:
    import gradclip_plugin

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK")}
    env.update(OMP_NUM_THREADS="1", PL_DISABLE_FORK="1", PYTHONWARNINGS="ignore")
    # the processes import the same gradclip_plugin as this test did
    root = str(Path(gradclip_plugin.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _wait(procs: list[subprocess.Popen], what: str) -> None:
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            outputs.append(out.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the process and any rank it started
        pytest.fail(f"{what} did not finish within {TIMEOUT_S}s")
    codes = [p.returncode for p in procs]
    logs = "\n".join(f"--- process {i} (exit {c}) ---\n{out[-5000:]}" for i, (c, out) in enumerate(zip(codes, outputs)))
    assert codes == [0] * len(procs), f"{what} failed:\n{logs}"


def run_pair(scenario: str, out_dir: Path) -> list[dict]:
    """Start two ranks of ``scenario`` that rendezvous through a file store; return their results."""
    env = _clean_env()
    env["GRADCLIP_STORE"] = str(out_dir / "store")
    procs = []
    for rank in range(2):
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, str(out_dir)],
                env={**env, "RANK": str(rank), "WORLD_SIZE": "2"},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    _wait(procs, scenario)
    return [torch.load(out_dir / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(2)]


def run_lightning(scenario: str, out_dir: Path, ns: str = "pytorch_lightning") -> list[dict]:
    """Start rank 0 of ``scenario`` under Lightning namespace ``ns``; Lightning's launcher starts rank 1
    and picks a free port."""
    proc = subprocess.Popen(
        [sys.executable, __file__, scenario, str(out_dir)],
        env={**_clean_env(), "GRADCLIP_NS": ns},
        cwd=out_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    _wait([proc], scenario)
    return [torch.load(out_dir / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(2)]


# ---------------------------------------------------------------------------------------------
# shared between the processes and the checks
# ---------------------------------------------------------------------------------------------
def full_tensors() -> dict[str, torch.Tensor]:
    """The unsharded tensors; "d" has one row, so rank 1's Shard(0) piece of it is empty."""
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(5, 3, generator=g) * 3,  # 5 rows over 2 ranks: uneven (3 + 2)
        "b": torch.randn(4, generator=g),
        "c": torch.randn(3, 2, generator=g),  # replicated: counted once
        "d": torch.randn(1, 4, generator=g),
        "e": torch.randn(2, 5, generator=g),  # sharded along dim 1
        "f": torch.randn(3, generator=g),  # a plain tensor, not a DTensor
    }


def placements_1d():
    from torch.distributed.tensor import Replicate, Shard

    return {"a": [Shard(0)], "b": [Shard(0)], "c": [Replicate()], "d": [Shard(0)], "e": [Shard(1)]}


# mesh shape -> placements per tensor, on a 2-D mesh of the 2 ranks
MESHES_2D = {
    (1, 2): ("rep_shard", "shard_shard"),
    (2, 1): ("shard_rep", "shard_shard"),
}


def placements_2d(kind: str):
    from torch.distributed.tensor import Replicate, Shard

    return {
        "rep_shard": [Replicate(), Shard(0)],
        "shard_rep": [Shard(0), Replicate()],
        "shard_shard": [Shard(0), Shard(0)],  # sharded over both mesh dims: two groups, reduced over each
    }[kind]


def ref_norm(tensors, p: float) -> torch.Tensor:
    """Independent reference: the norm of all tensors flattened into one vector."""
    return torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]), p)


def ref_tensor_norms(tensors, p: float) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm(t, p) for t in tensors])


# ---------------------------------------------------------------------------------------------
# the processes
# ---------------------------------------------------------------------------------------------
def _init_pair() -> int:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", init_method=f"file://{os.environ['GRADCLIP_STORE']}", rank=rank, world_size=2)
    return rank


class CountAllReduce:
    """Counts ``torch.distributed.all_reduce`` calls inside a ``with`` block."""

    def __enter__(self):
        self.calls = 0
        self._orig = torch.distributed.all_reduce

        def counting(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        torch.distributed.all_reduce = counting
        return self

    def __exit__(self, *exc):
        torch.distributed.all_reduce = self._orig


def clip_once(cb, grads):
    """A clipping callback's own ``measure`` and ``clip_`` on ``grads`` (as its hook runs them, no policy)."""
    from gradclip_plugin.callbacks import Step
    from gradclip_plugin.functional import combine_norms

    norms, extra = cb.measure(grads)
    return cb.clip_(grads, grads, Step(0, norms, combine_norms(norms, cb.norm_type), None, True, extra))


def scenario_dtensor(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor

    from gradclip_plugin import ClipByGlobalNorm, ClipByNorm, ClipByValue
    from gradclip_plugin.functional import (
        clip_by_global_norm_,
        clip_by_norm_,
        clip_by_value_,
        global_norm,
        subset_norms,
        tensor_norms,
    )

    rank = _init_pair()
    mesh = init_device_mesh("cpu", (2,))
    full = full_tensors()
    names = list(full)

    def sharded(mixed: bool = True) -> list[torch.Tensor]:
        """Fresh copies: the DTensors, then (if ``mixed``) the plain tensor "f"."""
        pl = placements_1d()
        ts = [distribute_tensor(full[n].clone(), mesh, pl[n]) if n in pl else full[n].clone() for n in names]
        return ts if mixed else ts[:N_DTENSORS]

    def gathered(ts) -> list[torch.Tensor]:
        return [t.full_tensor() if isinstance(t, DTensor) else t for t in ts]

    res: dict = {"local_shapes": [tuple(t.to_local().shape) if isinstance(t, DTensor) else None for t in sharded()]}
    for p in NORM_TYPES:
        ts = sharded()
        with CountAllReduce() as count:
            norms = tensor_norms(ts, p)
        res[("tensor_norms", p)] = norms
        res[("tensor_norms_type", p)] = type(norms).__name__
        res[("collectives", p)] = count.calls
        res[("global_norm", p)] = global_norm(ts, p)
        res[("subset_norms", p)] = subset_norms(norms, torch.tensor([[s == k for s in (0, 1, 0, 1, 1, 0)] for k in (0, 1)]), p)
        ts = sharded(mixed=False)
        res[("clip_by_global_norm_", p)] = (clip_by_global_norm_(ts, MAX_NORM, p), gathered(ts))
        ts = sharded(mixed=False)
        res[("clip_by_norm_", p)] = (clip_by_norm_(ts, MAX_NORM_PER_TENSOR, p), gathered(ts))
        # the callbacks' own measure/clip, unchanged, on sharded gradients
        for cb in (ClipByGlobalNorm(MAX_NORM, p), ClipByNorm(MAX_NORM_PER_TENSOR, p)):
            ts = sharded(mixed=False)
            stats = clip_once(cb, ts)
            res[(type(cb).__name__, p)] = (stats, gathered(ts))
    ts = sharded(mixed=False)
    clip_by_value_(ts, CLIP_VALUE)
    res["clip_by_value_"] = gathered(ts)
    cb = ClipByValue(CLIP_VALUE)
    ts = sharded(mixed=False)
    res["ClipByValue"] = (clip_once(cb, ts), gathered(ts))

    # DTensors and a plain tensor in one list (parameters left out of sharding): the in-place ops
    # must not hand DTensor's foreach kernels a mixed list, which they refuse
    mixed_ops = {
        "clip_by_global_norm_": lambda ts: clip_by_global_norm_(ts, MAX_NORM),
        "clip_by_norm_": lambda ts: clip_by_norm_(ts, MAX_NORM_PER_TENSOR),
        "clip_by_value_": lambda ts: clip_by_value_(ts, CLIP_VALUE),
    }
    for op, call in mixed_ops.items():
        ts = sharded()
        try:
            call(ts)
            res[("mixed", op)] = gathered(ts)
        except RuntimeError as err:  # recorded, so that the other checks still run
            res[("mixed", op)] = f"{type(err).__name__}: {err}"

    # a non-finite entry in rank 1's shard only (full row 3 of "a", rank 1's local row 0)
    for bad in (math.inf, math.nan):
        for p in (2.0, math.inf):
            ts = sharded()
            if rank == 1:
                ts[0].to_local()[0, 0] = bad
            res[("nonfinite", bad if not math.isnan(bad) else "nan", p)] = global_norm(ts, p)

    # 2-D meshes: replicated dims counted once, sharded dims reduced (over each one)
    for shape, kinds in MESHES_2D.items():
        mesh2 = init_device_mesh("cpu", shape, mesh_dim_names=("dp", "tp"))
        for kind in kinds:
            ts = [distribute_tensor(full[n].clone(), mesh2, placements_2d(kind)) for n in ("a", "b", "c")]
            for p in (2.0, math.inf):
                with CountAllReduce() as count:
                    res[("mesh2d", shape, kind, p)] = tensor_norms(ts, p)
                res[("mesh2d_collectives", shape, kind, p)] = count.calls

    # plain tensors holding disjoint pieces over a group (FSDP1 flat shards)
    pieces = [full[n].flatten().tensor_split(2)[rank] for n in names]
    for p in NORM_TYPES:
        with CountAllReduce() as count:
            res[("flat_shards", p)] = tensor_norms(pieces, p, shard_group=dist.group.WORLD)
        res[("flat_shards_collectives", p)] = count.calls
        res[("flat_shards_global", p)] = global_norm(pieces, p, shard_group=dist.group.WORLD)

    partial = DTensor.from_local(torch.ones(3), mesh, [Partial()])
    try:
        tensor_norms([partial])
        res["partial_error"] = None
    except ValueError as err:
        res["partial_error"] = str(err)
    from gradclip_plugin.functional import unitwise_norms

    try:  # AGC's unit-wise norms would see only the local piece of a unit: refused, not mis-measured
        unitwise_norms(sharded(mixed=False))
        res["unitwise_error"] = None
    except ValueError as err:
        res["unitwise_error"] = str(err)

    res["fsdp2"] = fsdp2_part()
    res["fsdp1"] = fsdp1_part()
    torch.save(res, out_dir / f"dtensor_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def fsdp2_part() -> dict:
    """``fully_shard`` by hand on a CPU mesh; the reference is the same network, unsharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradclip_plugin import ClipByGlobalNorm

    mesh = init_device_mesh("cpu", (2,))
    ref, net = _small_net(), _small_net()
    for layer in (net[0], net[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 10  # the same batch on both ranks
    ref(x).square().sum().backward()
    net(x).square().sum().backward()  # FSDP2 averages over ranks: equal batches give the full-batch gradient
    grads = [p.grad for p in net.parameters()]
    cb = ClipByGlobalNorm(MAX_NORM)
    before = [g.full_tensor() for g in grads]
    stats = clip_once(cb, grads)
    res = {
        "placements": [tuple(repr(pl) for pl in g.placements) for g in grads],
        "ref_grads": [p.grad for p in ref.parameters()],
        "before": before,
        "after": [g.full_tensor() for g in grads],
        "norm": stats.norm,
    }
    return res


def fsdp1_part() -> dict:
    """FSDP1 ``use_orig_params=True`` on CPU: each rank holds flat pieces of the parameters.

    A rank holding no piece of a parameter has ``grad=None`` there (and an empty parameter); the
    pieces, an empty one for each ``None``, are passed in parameter order on every rank.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from gradclip_plugin.functional import clip_coefficient, global_norm, scale_, tensor_norms

    ref, net = _small_net(), _small_net()
    model = FSDP(net, device_id=torch.device("cpu"), use_orig_params=True)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 10
    ref(x).square().sum().backward()
    model(x).square().sum().backward()
    params = list(model.parameters())
    pieces = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    res = {
        "none_grads": sum(p.grad is None for p in params),
        "ref_grads": [p.grad for p in ref.parameters()],
        "tensor_norms": tensor_norms(pieces, 2.0, shard_group=model.process_group),
        "pieces_before": [g.clone() for g in pieces],
    }
    res["norm"] = norm = global_norm(pieces, 2.0, shard_group=model.process_group)
    scale_(pieces, clip_coefficient(MAX_NORM, norm))
    res["pieces_after"] = [g.clone() for g in pieces]
    return res


def _ns() -> str:
    """The Lightning namespace a scenario runs under (``run_lightning(..., ns=)``)."""
    return os.environ.get("GRADCLIP_NS", "pytorch_lightning")


def _ns_class(path: str):
    """The class ``path`` (``"strategies.FSDPStrategy"``) of the scenario's namespace."""
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"{_ns()}.{module}"), name)


def _lightning_run(out_dir: Path, scenario: str, strategy, model, max_steps: int, **trainer_kwargs) -> None:
    import importlib

    from gradclip_plugin import ClipByGlobalNorm
    from helpers import make_loader

    pl = importlib.import_module(_ns())
    Callback = pl.Callback  # noqa: N806

    class FullGrads(Callback):
        """Every gradient at each optimizer step, gathered to the full tensor when sharded."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.steps.append({n: _full(p.grad) for n, p in pl_module.named_parameters()})

    class Weights(Callback):
        """The weights before training (entry 0) and after each batch (entry ``step + 1``)."""

        def __init__(self) -> None:
            self.steps: list[dict] = []

        def on_train_start(self, trainer, pl_module):
            self.on_train_batch_end(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.steps.append({n: _full(p.detach()) for n, p in pl_module.named_parameters()})

    class RecordingClip(ClipByGlobalNorm):
        """Records the measured (pre-clip) norm of each step."""

        norms: list

        def measure(self, grads):
            measured = super().measure(grads)
            self.norms.append(torch.linalg.vector_norm(measured[0]).cpu())  # the total of the per-tensor norms
            return measured

    pl.seed_everything(0)
    clip = RecordingClip(0.1)
    clip.norms = []
    before, after, weights = FullGrads(), FullGrads(), Weights()
    trainer = pl.Trainer(
        strategy=strategy,
        devices=2,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[before, clip, after, weights],
        **trainer_kwargs,
    )
    trainer.fit(model, make_loader(n=32, batch_size=4))
    optimizer = trainer.optimizers[0]
    adam_steps = [_full(optimizer.state[p]["step"]) for p in model.parameters() if p in optimizer.state]
    res = {
        "norms": clip.norms,
        "before": before.steps,
        "after": after.steps,
        "weights": weights.steps,
        "nonfinite_steps": {i: t["steps"] - t["finite"] for i, t in clip.state_dict()["tallies"].items()},
        "adam_steps": adam_steps,
        "global_step": trainer.global_step,
    }
    torch.save(res, out_dir / f"{scenario}_rank{trainer.global_rank}.pt")


def _full(t):
    if t is None:
        return None
    from gradclip_plugin.functional.distributed import is_dtensor

    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu().clone()


BAD_STEP = 1  # the step at which rank 1 (only) produces a non-finite loss
DDP_STEPS = 4


def _injecting_model_cls():
    from torch import nn

    from helpers import for_namespace

    class InjectingModel(for_namespace(_ns()).TinyModel):
        """Rank 1 feeds an infinite target at ``BAD_STEP``: its gradients are non-finite there."""

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_rank == 1 and batch_idx == BAD_STEP:
                y = y.clone()
                y[0, 0] = math.inf
            return nn.functional.mse_loss(self(x), y)

    return InjectingModel


def scenario_ddp(out_dir: Path) -> None:
    model = _injecting_model_cls()(lr=0.01, optimizer="adam")
    _lightning_run(out_dir, "ddp", "ddp", model, DDP_STEPS, accelerator="cpu")


def _fsdp2_model_cls():
    from torch.distributed.fsdp import fully_shard

    base = _injecting_model_cls()

    class ShardedModel(base):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.encoder, self.head):
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    return ShardedModel


def scenario_model_parallel(out_dir: Path) -> None:
    ModelParallelStrategy = _ns_class("strategies.ModelParallelStrategy")  # noqa: N806

    model = _fsdp2_model_cls()(lr=0.01, optimizer="adam")
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    _lightning_run(out_dir, "model_parallel", strategy, model, DDP_STEPS, accelerator="cpu")


def scenario_fsdp_cuda(out_dir: Path) -> None:
    from pytorch_lightning.strategies import FSDPStrategy

    model = _injecting_model_cls()(lr=0.01, optimizer="adam")
    _lightning_run(out_dir, "fsdp_cuda", FSDPStrategy(), model, DDP_STEPS, accelerator="cuda")


def scenario_fsdp_cpu(out_dir: Path) -> None:
    """Lightning's ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) on CPU.

    Lightning refuses FSDP without a GPU, testing ``type(strategy) is FSDPStrategy``, and its
    wrapper passes ``device_id=None`` (which FSDP1 refuses on CPU); this subclass gets past both
    and is otherwise Lightning's strategy: its process group, training loop and optimizer setup.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(_ns_class("strategies.FSDPStrategy")):
        def _setup_model(self, model):
            return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)

    model = _injecting_model_cls()(lr=0.01, optimizer="adam")
    _lightning_run(out_dir, "fsdp_cpu", CPUFSDPStrategy(), model, DDP_STEPS, accelerator="cpu")


def scenario_fabric_ddp(out_dir: Path) -> None:
    """Lightning Fabric, DDP on 2 CPU processes: ``clip_gradients`` between backward and step; rank 1
    feeds an infinite target at ``BAD_STEP``."""
    from lightning.fabric import Fabric
    from torch import nn

    from gradclip_plugin import ClipByGlobalNorm
    from helpers import make_loader

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model, opt = fabric.setup(model, torch.optim.Adam(model.parameters(), lr=0.01))
    clip = ClipByGlobalNorm(0.1)
    res: dict = {"before": [], "after": [], "weights": [], "metrics": []}
    for step, (x, y) in enumerate(make_loader(n=32, batch_size=4, seed=fabric.global_rank)):
        if step == DDP_STEPS:
            break
        if fabric.global_rank == 1 and step == BAD_STEP:
            y = y.clone()
            y[0, 0] = math.inf
        fabric.backward(nn.functional.mse_loss(model(x), y))
        res["before"].append([p.grad.clone() for p in model.parameters()])
        res["metrics"].append(clip.clip_gradients(model, opt, fabric=fabric))
        res["after"].append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        res["weights"].append([p.detach().clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
    res["final"] = [p.detach().clone() for p in model.parameters()]
    res["adam_steps"] = [int(s["step"]) for s in opt.optimizer.state.values()]
    torch.save(res, out_dir / f"fabric_ddp_rank{fabric.global_rank}.pt")


def scenario_fabric_fsdp_cpu(out_dir: Path) -> None:
    """Lightning Fabric's ``FSDPStrategy`` (FSDP1) on 2 CPU processes. Fabric refuses the strategy
    without a GPU (a subclass gets past), and wraps a model for CPU with ``device_id=None``, which FSDP1
    refuses, but leaves alone a model already wrapped: wrapped here."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import FSDPStrategy
    from torch import nn
    from torch.distributed.fsdp import FullyShardedDataParallel

    from gradclip_plugin import ClipByGlobalNorm
    from helpers import make_loader

    class CPUFSDPStrategy(FSDPStrategy):  # Fabric refuses `type(strategy) is FSDPStrategy` without a GPU
        pass

    fabric = Fabric(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy())
    fabric.launch()
    fabric.seed_everything(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    model = fabric.setup_module(FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=True))
    opt = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.01))
    clip = ClipByGlobalNorm(0.1)
    res: dict = {"local_squares": [], "metrics": [], "after_squares": []}
    for step, (x, y) in enumerate(make_loader(n=16, batch_size=4, seed=fabric.global_rank)):
        fabric.backward(nn.functional.mse_loss(model(x), y))
        res["local_squares"].append(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
        res["metrics"].append(clip.clip_gradients(model, opt, fabric=fabric))
        res["after_squares"].append(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
        opt.step()
        opt.zero_grad()
    torch.save(res, out_dir / f"fabric_fsdp_cpu_rank{fabric.global_rank}.pt")


def scenario_ddp_spikes(out_dir: Path) -> None:
    """SkipSpikes under DDP: each rank has its own loss; rank 1's is 1,000 times larger at step 6."""
    import importlib

    from gradclip_plugin import SkipSpikes
    from helpers import make_loader

    pl = importlib.import_module(_ns())

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.local = torch.nn.Linear(8, 1), []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y) * (1e3 if (self.global_step, self.global_rank) == (6, 1) else 1.0)
            self.local.append(float(loss))
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Recording(SkipSpikes):
        def clip_(self, grads, params, step):
            self.losses.append(float(self._step_loss))  # the loss it decides on
            return super().clip_(grads, params, step)

    pl.seed_everything(0)
    model, cb = Model(), Recording(window=4, sigma=3.0, watch="loss")
    cb.losses = []
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=10, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])  # fmt: skip
    trainer.fit(model, make_loader(n=80, batch_size=4))
    res = {"local": model.local, "losses": cb.losses, "skipped": [s.global_step for s in cb.skipped]}
    torch.save(res, out_dir / f"ddp_spikes_rank{trainer.global_rank}.pt")


SCENARIOS = {
    "ddp_spikes": scenario_ddp_spikes,
    "fabric_ddp": scenario_fabric_ddp,
    "fabric_fsdp_cpu": scenario_fabric_fsdp_cpu,
    "dtensor": scenario_dtensor,
    "ddp": scenario_ddp,
    "model_parallel": scenario_model_parallel,
    "fsdp_cuda": scenario_fsdp_cuda,
    "fsdp_cpu": scenario_fsdp_cpu,
}


# ---------------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------------
def _equal_on_both_ranks(r0, r1) -> None:
    """Bit-for-bit equality of nested results (tensors, lists, tuples, dicts, numbers)."""
    if isinstance(r0, torch.Tensor):
        assert torch.equal(r0, r1) or (r0.isnan().any() and torch.equal(r0.isnan(), r1.isnan())), (r0, r1)
    elif isinstance(r0, dict):
        assert r0.keys() == r1.keys()
        for k in r0:
            _equal_on_both_ranks(r0[k], r1[k])
    elif isinstance(r0, (list, tuple)):
        assert len(r0) == len(r1)
        for a, b in zip(r0, r1):
            _equal_on_both_ranks(a, b)
    else:
        assert r0 == r1


def _close(actual, expected) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def dtensor_results(tmp_path_factory):
    return run_pair("dtensor", tmp_path_factory.mktemp("dtensor"))


def test_dtensor_shards_are_uneven_and_one_is_empty(dtensor_results):
    r0, r1 = dtensor_results
    assert r0["local_shapes"][:5] == [(3, 3), (2,), (3, 2), (1, 4), (2, 3)]
    assert r1["local_shapes"][:5] == [(2, 3), (2,), (3, 2), (0, 4), (2, 2)]


@pytest.mark.parametrize("p", NORM_TYPES)
def test_dtensor_norms_are_those_of_the_full_tensors(dtensor_results, p):
    full = list(full_tensors().values())
    for res in dtensor_results:
        assert res[("tensor_norms_type", p)] == "Tensor"  # a plain tensor, not a DTensor
        _close(res[("tensor_norms", p)], ref_tensor_norms(full, p))
        _close(res[("global_norm", p)], ref_norm(full, p))
        seg = res[("subset_norms", p)]
        _close(seg[0], ref_norm([full[i] for i in (0, 2, 5)], p))
        _close(seg[1], ref_norm([full[i] for i in (1, 3, 4)], p))
    r0, r1 = ({k: v for k, v in res.items() if k not in ("local_shapes", "fsdp1")} for res in dtensor_results)
    _equal_on_both_ranks(r0, r1)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_dtensor_norms_take_one_all_reduce(dtensor_results, p):
    # four sharded tensors on one mesh dimension, one replicated, one plain: a single collective
    assert [res[("collectives", p)] for res in dtensor_results] == [1, 1]


@pytest.mark.parametrize("p", NORM_TYPES)
def test_dtensor_clip_by_global_norm_matches_full_tensors(dtensor_results, p):
    full = list(full_tensors().values())[:N_DTENSORS]
    norm = ref_norm(full, p)
    coef = min(1.0, MAX_NORM / norm.item())
    assert coef < 1  # the case exercises clipping
    for res in dtensor_results:
        for key in (("clip_by_global_norm_", p), ("ClipByGlobalNorm", p)):
            measured, clipped = res[key]
            measured = measured.norm if key[0] == "ClipByGlobalNorm" else measured
            _close(measured, norm)
            for got, t in zip(clipped, full):
                _close(got, t * coef)
        stats = res[("ClipByGlobalNorm", p)][0]
        _close(stats.norm_clipped, torch.tensor(MAX_NORM))
        assert bool(stats.clipped)


@pytest.mark.parametrize("p", NORM_TYPES)
def test_dtensor_clip_by_norm_matches_full_tensors(dtensor_results, p):
    full = list(full_tensors().values())[:N_DTENSORS]
    ref = ref_tensor_norms(full, p)
    coefs = torch.clamp(MAX_NORM_PER_TENSOR / ref, max=1.0)
    assert (coefs < 1).any() and (coefs == 1).any()  # both cases present
    for res in dtensor_results:
        norms, clipped = res[("clip_by_norm_", p)]
        _close(norms, ref)
        stats, cb_clipped = res[("ClipByNorm", p)]
        _close(stats.norm, ref_norm(full, p))
        for got, got_cb, t, c in zip(clipped, cb_clipped, full, coefs):
            _close(got, t * c)
            _close(got_cb, t * c)


def test_dtensor_clip_by_value_matches_full_tensors(dtensor_results):
    full = list(full_tensors().values())[:N_DTENSORS]
    for res in dtensor_results:
        for got, t in zip(res["clip_by_value_"], full):
            assert torch.equal(got, t.clamp(-CLIP_VALUE, CLIP_VALUE))
        stats, clipped = res["ClipByValue"]
        _close(stats.norm, ref_norm(full, math.inf))
        assert bool(stats.clipped)


def test_dtensors_and_plain_tensors_clip_together(dtensor_results):
    full = list(full_tensors().values())
    norm = ref_norm(full, 2.0)
    coefs = torch.clamp(MAX_NORM_PER_TENSOR / ref_tensor_norms(full, 2.0), max=1.0)
    expected = {
        "clip_by_global_norm_": [t * (MAX_NORM / norm) for t in full],
        "clip_by_norm_": [t * c for t, c in zip(full, coefs)],
        "clip_by_value_": [t.clamp(-CLIP_VALUE, CLIP_VALUE) for t in full],
    }
    for res in dtensor_results:
        for op, ref in expected.items():
            got = res[("mixed", op)]
            assert not isinstance(got, str), f"{op} on DTensors plus a plain tensor: {got}"
            for g, t in zip(got, ref):
                _close(g, t)


@pytest.mark.parametrize("bad", [math.inf, "nan"])
@pytest.mark.parametrize("p", [2.0, math.inf])
def test_dtensor_nonfinite_on_one_rank_reaches_both(dtensor_results, bad, p):
    full = list(full_tensors().values())
    full[0][3, 0] = math.nan if bad == "nan" else bad  # rank 1's local row 0 of "a"
    expected = ref_norm(full, p)
    assert not torch.isfinite(expected)
    for res in dtensor_results:
        got = res[("nonfinite", bad, p)]
        if bad == "nan":
            assert got.isnan(), got  # gloo's MAX alone would give rank 1's finite maximum
        else:
            assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", list(MESHES_2D))
def test_dtensor_2d_mesh_counts_replicas_once(dtensor_results, shape):
    full = list(full_tensors().values())[:3]
    for kind in MESHES_2D[shape]:
        n_sharded_dims = sum(pl.is_shard() for pl in placements_2d(kind))
        for p in (2.0, math.inf):
            for res in dtensor_results:
                _close(res[("mesh2d", shape, kind, p)], ref_tensor_norms(full, p))
                assert res[("mesh2d_collectives", shape, kind, p)] == n_sharded_dims


@pytest.mark.parametrize("p", NORM_TYPES)
def test_flat_shards_over_a_group_give_full_norms(dtensor_results, p):
    full = list(full_tensors().values())
    for res in dtensor_results:
        _close(res[("flat_shards", p)], ref_tensor_norms(full, p))
        _close(res[("flat_shards_global", p)], ref_norm(full, p))
        assert res[("flat_shards_collectives", p)] == 1


@pytest.mark.parametrize("p", NORM_TYPES)
def test_empty_tensor_has_norm_zero_in_one_process(p):
    # a rank's share of a small sharded tensor is often empty; the inf-norm kernel refuses empty input
    from gradclip_plugin.functional import global_norm, tensor_norms

    t = torch.randn(3, 4)
    norms = tensor_norms([torch.zeros(0, 4), t, torch.zeros(0, dtype=torch.float16)], p)
    assert torch.equal(norms, torch.stack([torch.tensor(0.0), torch.linalg.vector_norm(t, p), torch.tensor(0.0)]))
    assert torch.equal(global_norm([torch.zeros(0)], p), torch.tensor(0.0))


def test_dtensor_unitwise_norms_are_refused(dtensor_results):
    for res in dtensor_results:
        assert res["unitwise_error"] is not None and "sharded (DTensor)" in res["unitwise_error"]


def test_dtensor_partial_placement_is_refused(dtensor_results):
    for res in dtensor_results:
        assert res["partial_error"] is not None and "Partial" in res["partial_error"]
        assert "redistribute" in res["partial_error"]


def test_fsdp2_fully_shard_clips_by_the_full_norm(dtensor_results):
    r0, r1 = (res["fsdp2"] for res in dtensor_results)
    _equal_on_both_ranks(r0, r1)
    for res in (r0, r1):
        assert res["placements"] == [("Shard(dim=0)",)] * 4  # the gradients really are sharded
        for got, ref in zip(res["before"], res["ref_grads"]):
            _close(got, ref)
        norm = ref_norm(res["ref_grads"], 2.0)
        _close(res["norm"], norm)
        coef = MAX_NORM / norm.item()
        assert coef < 1
        for got, ref in zip(res["after"], res["ref_grads"]):
            _close(got, ref * coef)


def test_fsdp1_flat_shards_give_the_full_norm(dtensor_results):
    r0, r1 = (res["fsdp1"] for res in dtensor_results)
    assert r0["none_grads"] + r1["none_grads"] > 0  # the case where a rank holds nothing of a parameter
    ref = r0["ref_grads"]
    for res in (r0, r1):
        _close(res["tensor_norms"], ref_tensor_norms(ref, 2.0))
        _close(res["norm"], ref_norm(ref, 2.0))
    # the pieces of both ranks, put together, are the full gradients, clipped by the full norm
    coef = MAX_NORM / ref_norm(ref, 2.0).item()
    assert coef < 1
    for before0, before1, after0, after1, g in zip(
        r0["pieces_before"], r1["pieces_before"], r0["pieces_after"], r1["pieces_after"], ref
    ):
        _close(torch.cat([before0, before1]), g.flatten())
        _close(torch.cat([after0, after1]), g.flatten() * coef)


def _check_lightning_run(r0: dict, r1: dict) -> None:
    """Both ranks: the same norms, clipped gradients, skip decision and weights; clipping exact."""
    _equal_on_both_ranks(r0, r1)
    res = r0
    assert len(res["norms"]) == DDP_STEPS
    for step, (norm, before, after) in enumerate(zip(res["norms"], res["before"], res["after"])):
        if step == BAD_STEP:
            assert not torch.isfinite(norm)
            assert any(not torch.isfinite(g).all() for g in before.values())
            assert all(g is None for g in after.values())  # skipped: gradients dropped
            assert all(torch.equal(res["weights"][step + 1][n], res["weights"][step][n]) for n in before)
            continue
        ref = ref_norm(list(before.values()), 2.0)
        _close(norm, ref)
        coef = min(1.0, 0.1 / ref.item())
        assert coef < 1
        for n, g in before.items():
            _close(after[n], g * coef)
        assert not any(torch.equal(res["weights"][step + 1][n], res["weights"][step][n]) for n in before)
    assert res["nonfinite_steps"] == {0: 1.0}
    assert all(int(s) == DDP_STEPS - 1 for s in res["adam_steps"])  # Adam did not count the skipped step


def test_ddp_ranks_agree_on_norms_clipping_and_skips(tmp_path):
    r0, r1 = run_lightning("ddp", tmp_path)
    _check_lightning_run(r0, r1)


def test_skip_spikes_decides_on_the_loss_averaged_over_ranks(tmp_path):
    r0, r1 = run_lightning("ddp_spikes", tmp_path)
    assert r0["losses"] == r1["losses"] and r0["skipped"] == r1["skipped"] == [6]  # one decision, on both ranks
    assert r0["losses"] == pytest.approx([(a + b) / 2 for a, b in zip(r0["local"], r1["local"])], rel=1e-6)
    assert r0["local"][6] != r1["local"][6]


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_model_parallel_fsdp2_clips_by_the_full_norm(tmp_path, ns):
    r0, r1 = run_lightning("model_parallel", tmp_path, ns)
    _check_lightning_run(r0, r1)


def test_fabric_ddp_ranks_agree_on_norms_clipping_and_skips(tmp_path):
    r0, r1 = run_lightning("fabric_ddp", tmp_path)
    _equal_on_both_ranks(r0, r1)
    for step, (before, after, metrics) in enumerate(zip(r0["before"], r0["after"], r0["metrics"])):
        if step == BAD_STEP:  # a NaN on rank 1 reached both through DDP's all-reduce: both skip
            assert not all(torch.isfinite(g).all() for g in before)
            # in a loop the gradients are taken when the step begins: after the call they are as they were
            assert all(torch.allclose(a, b, equal_nan=True) for a, b in zip(after, before))
            assert metrics["grad_clip/nonfinite_steps"] == 1.0
            assert all(torch.equal(a, b) for a, b in zip(r0["weights"][step], r0["weights"][step + 1]))
            continue
        norm = ref_norm(before, 2.0)
        _close(torch.tensor(metrics["grad_clip/norm"], dtype=torch.float64), norm.double())
        for g, a in zip(before, after):
            _close(a, g * (0.1 / norm.item()))
    assert r0["adam_steps"] == [DDP_STEPS - 1] * 4


def _check_flat_shard_run(r0: dict, r1: dict) -> None:
    """FSDP1: each rank records its flat pieces (``None`` where it holds none); put together, they
    are the full gradients, clipped by their norm; both ranks measure that norm and decide alike."""
    for key in ("norms", "nonfinite_steps", "global_step"):
        _equal_on_both_ranks(r0[key], r1[key])

    def whole(d0: dict, d1: dict) -> dict:
        empty = torch.zeros(0)
        return {n: torch.cat([empty if d0[n] is None else d0[n], empty if d1[n] is None else d1[n]]) for n in d0}

    assert any(g is None for g in r0["before"][0].values()) or any(g is None for g in r1["before"][0].values())
    for step, norm in enumerate(r0["norms"]):
        before = whole(r0["before"][step], r1["before"][step])
        after = [r0["after"][step], r1["after"][step]]
        if step == BAD_STEP:
            assert not torch.isfinite(norm)
            assert not torch.isfinite(torch.cat(list(before.values()))).all()
            assert all(g is None for a in after for g in a.values())  # skipped on both ranks
            for res in (r0, r1):
                assert all(torch.equal(res["weights"][step + 1][n], res["weights"][step][n]) for n in before)
            continue
        ref = ref_norm(list(before.values()), 2.0)
        _close(norm, ref)
        coef = min(1.0, 0.1 / ref.item())
        assert coef < 1
        after = whole(*after)
        for n, g in before.items():
            _close(after[n], g * coef)
    for res in (r0, r1):
        assert res["nonfinite_steps"] == {0: 1.0}
        assert all(int(s) == DDP_STEPS - 1 for s in res["adam_steps"])


def test_fabric_fsdp_clips_by_the_norm_of_the_full_gradients(tmp_path):
    r0, r1 = run_lightning("fabric_fsdp_cpu", tmp_path)
    assert r0["metrics"] == r1["metrics"]  # both ranks measure the same norm
    for step, metrics in enumerate(r0["metrics"]):
        full = math.sqrt(r0["local_squares"][step] + r1["local_squares"][step])  # the two shards make the whole
        assert 0 < r0["local_squares"][step] < full**2  # each rank holds only part of it
        assert metrics["grad_clip/norm"] == pytest.approx(full, rel=1e-5)
        assert math.sqrt(r0["after_squares"][step] + r1["after_squares"][step]) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("ns", ["pytorch_lightning", "lightning.pytorch"])
def test_fsdp_strategy_on_cpu_clips_by_the_full_norm(tmp_path, ns):
    r0, r1 = run_lightning("fsdp_cpu", tmp_path, ns)
    _check_flat_shard_run(r0, r1)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="Lightning's FSDP strategy needs 2 CUDA devices")
def test_fsdp_strategy_clips_by_the_full_norm(tmp_path):
    r0, r1 = run_lightning("fsdp_cuda", tmp_path)
    _check_flat_shard_run(r0, r1)


if __name__ == "__main__":
    SCENARIOS[sys.argv[1]](Path(sys.argv[2]))
    import torch.distributed as dist

    if dist.is_initialized():  # gloo's threads left running at exit abort a rank now and then ("terminate called")
        dist.barrier()
        dist.destroy_process_group()
