"""The fate of an optimizer step (``gradclip_plugin/callbacks/step.py``), and what meets at a skipped step.

* **The decision as a table** (:func:`decide`, no Trainer): every combination of the non-finite policy, a
  loss scaler, ``skip_above`` (none, below or above the norm), the norm (small, large, inf, NaN), whether
  the rule reads the norm and whether the optimizer takes a ``found_inf``, against :func:`expected_fate`, a
  reference written here from the docstrings, with the reads of the norm counted.
* **The guard** (:class:`StepGuard`) on bare optimizers: a skip hides the gradients and its post-hook puts
  them back; a skip whose step never ran is dropped or restored; a flag is a ``found_inf`` that combines
  with another's; nothing is left after ``undo``; a dead optimizer takes its record along.
* **The grid** (STYLE 17): optimizer (7: SGD; SGD foreach with momentum; fused Adam; fused AdamW; fused SGD;
  fused SGD with momentum; the same gaining a param group, with a new parameter, at the skipped step) x loss
  scaler (none; fp16 ``GradScaler``) x why step 2 of the first optimizer is skipped (non-finite gradients;
  ``skip_above``; ZClip's ``skip_step_z_thresh``; not skipped) x sharing (alone; a parameter shared with a
  second optimizer, one callback clipping both; shared, only the first optimizer's own layer selected,
  ``include``) = 168 cells, in each of three loops: the Trainer (manual optimization where two optimizers
  share), ``clip_gradients`` in a plain loop (with its own ``GradScaler``) and in a Fabric loop. The full
  product in all three: a cell takes ~0.1 s. One function, :func:`check_cell`, asserts in every cell: the
  skipped optimizer's weights and ``state_dict()`` bit for bit across the skipped step; the step's path (a
  ``found_inf`` of 0 or 1 on the device where the optimizer takes one, else the gradients hidden on the host
  and put back right after the step); the clipping of the steps that ran (pre-clip norms of the probed
  gradients, in float64) and the parameters not selected left alone; the second optimizer stepping with
  the shared gradient as the first left it (its true gradient where the first skipped); the counts
  (checkpointed tallies, and the metrics written at each step or returned); the warnings; the scaler's
  scale; and nothing left on the optimizers.

  Cells that cannot hold by construction are marked, not loosened:

  * sharing under a ``GradScaler`` (skipped): ``GradScaler.unscale_`` divides the gradient of a parameter
    held by two optimizers once per optimizer (and Lightning and Fabric call ``scaler.update()`` after each
    ``optimizer.step()``, so the second optimizer unscales with another scale): no loop steps the second
    optimizer with the true gradient, with or without a callback;
  * a param group added at a step the scaler skips, fused SGD with momentum, in the Trainer and Fabric (xfail,
    strict): the callback leaves a non-finite step to the scaler, which skips it on the device, after torch's
    fused SGD has made the new group's momentum buffers with ``empty_like`` (a ``momentum_buffer`` in the
    state, never written); the Trainer (at fit start) and Fabric (at the first call) warn of fused SGD with
    momentum under a scaler. (In a
    plain loop the callback cannot see the scaler: it hides the gradients, and the cell holds.)
* **Failures and folds** (STYLE 18): a fit that raises leaves neither a ``found_inf`` nor a hook (and hidden
  gradients are put back); one callback clips 20 folds of a plain loop, each with a new model and optimizer;
  two optimizers clipped before either steps keep a shared gradient for the second's clipping.
"""

from __future__ import annotations

import copy
import gc
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState

from gradclip_plugin import ClipByGlobalNorm, ZClip
from gradclip_plugin.callbacks.step import StepGuard, decide, takes_found_inf

INF, NAN = float("inf"), float("nan")


# ============================================================================ A. the decision, as a table
def expected_fate(policy: str, scaler: bool, skip_above: Optional[float], norm: float, read: bool, takes_flag: bool):
    """``(action, host, nonfinite, spike, flag)`` of a step of total norm ``norm``, from ``decide``'s docstring.

    A non-finite norm is the policy's to handle, unless a loss scaler is there (it skips such steps itself)
    or the policy is ``"ignore"``. ``skip_above`` skips a finite norm above it, never a non-finite one. The
    step is left to the device (a 0/1 flag, nothing read) where the optimizer takes a ``found_inf``, the rule
    does not read the norm, the policy is one that skips (or lets through), and there is something to
    decide; the norm is read to the host (once) where the rule reads it or there is something to decide.
    """
    finite = math.isfinite(norm)
    ours = not scaler and policy != "ignore"
    spike = finite and skip_above is not None and norm > skip_above
    something = ours or skip_above is not None
    if takes_flag and not read and policy in ("skip", "ignore") and something:
        return "device", None, not finite, spike, 1.0 if spike or (ours and not finite) else 0.0
    host = norm if read or something else None
    if ours and not finite:
        return policy, host, True, False, None
    return "skip" if spike else "run", host, not finite, spike, None


NORMS = {"small": 0.5, "large": 100.0, "inf": INF, "nan": NAN}


@pytest.mark.parametrize("takes_flag", [False, True], ids=["host-opt", "flag-opt"])
@pytest.mark.parametrize("read", [False, True], ids=["no-read", "reads"])
@pytest.mark.parametrize("norm", list(NORMS), ids=list(NORMS))
@pytest.mark.parametrize("skip_above", [None, 1.0, 1e6], ids=["no-skip_above", "skip_above=1", "skip_above=1e6"])
@pytest.mark.parametrize("scaler", [False, True], ids=["no-scaler", "scaler"])
@pytest.mark.parametrize("policy", ["skip", "error", "zero", "ignore"])
def test_decide_against_the_reference_table(monkeypatch, policy, scaler, skip_above, norm, read, takes_flag):
    value = NORMS[norm]
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t) or item(t))
    fate = decide(torch.tensor(value), policy=policy, scaler=scaler, skip_above=skip_above, read=read,
                  takes_flag=takes_flag)
    monkeypatch.undo()
    action, host, nonfinite, spike, flag = expected_fate(policy, scaler, skip_above, value, read, takes_flag)
    assert fate.action == action
    assert len(reads) == (host is not None), "the norm is read once where the host decides, never otherwise"
    if host is None:
        assert fate.host is None
    else:
        assert fate.host == host or (math.isnan(fate.host) and math.isnan(host))
    assert bool(fate.nonfinite) is nonfinite and bool(fate.spike) is spike
    if flag is None:
        assert fate.flag is None
    else:
        assert isinstance(fate.flag, Tensor) and fate.flag.shape == () and fate.flag.dtype.is_floating_point
        assert fate.flag.item() == flag


def test_the_reference_table_has_every_action():
    # the table is not vacuous: each action (and each flag value) occurs in it
    seen = {
        (a, f)
        for p, s, sa, n, r, t in itertools.product(["skip", "error", "zero", "ignore"], [False, True], [None, 1.0, 1e6],
                                                    NORMS.values(), [False, True], [False, True])  # fmt: skip
        for a, _, _, _, f in [expected_fate(p, s, sa, n, r, t)]
    }
    assert seen == {("run", None), ("skip", None), ("error", None), ("zero", None), ("device", 0.0), ("device", 1.0)}


# ============================================================================ B. the guard
def two_params(fused: bool = False, momentum: float = 0.0):
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))
    kwargs = {"fused": True} if fused else {"foreach": False}
    opt = torch.optim.SGD([a], lr=0.1, momentum=momentum, **kwargs)
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.tensor([0.5, -0.5]), torch.tensor([2.0])
    return opt, a, b


def nothing_left(opt: torch.optim.Optimizer) -> None:
    assert "found_inf" not in opt.__dict__
    assert len(opt._optimizer_step_post_hooks) == 0


def test_a_skip_hides_every_gradient_and_the_step_puts_them_back():
    opt, a, b = two_params(momentum=0.9)
    grads = (a.grad, b.grad)
    weights, state = [a.detach().clone(), b.detach().clone()], copy.deepcopy(opt.state_dict())
    guard = StepGuard()
    guard.skip(opt)
    assert a.grad is None and b.grad is None  # of every param group
    opt.step()
    assert torch.equal(a, weights[0]) and torch.equal(b, weights[1])
    assert opt.state_dict() == state and not opt.state  # no momentum buffer made
    assert a.grad is grads[0] and b.grad is grads[1]  # put back, the same tensors
    guard.undo(opt)
    nothing_left(opt)
    assert a.grad is grads[0] and b.grad is grads[1]  # nothing hidden twice, nothing lost
    opt.step()  # the next step runs
    assert not torch.equal(a, weights[0])


def test_a_skip_whose_step_never_ran_is_dropped_or_restored():
    opt, a, b = two_params()
    guard = StepGuard()
    guard.skip(opt)
    guard.undo(opt, restore=False)  # new gradients come next: the hidden ones are dropped
    assert a.grad is None and b.grad is None
    nothing_left(opt)
    assert len(guard._records) == 0
    a.grad, b.grad = torch.ones(2), torch.ones(1)
    grads = (a.grad, b.grad)
    guard.skip(opt)
    guard.undo()  # every optimizer; restored (a failed fit)
    assert a.grad is grads[0] and b.grad is grads[1]
    nothing_left(opt)


def test_a_gradient_made_after_the_skip_is_not_overwritten_by_the_restore():
    opt, a, b = two_params()
    guard = StepGuard()
    guard.skip(opt)
    fresh = torch.full((2,), 7.0)
    a.grad = fresh  # e.g. another backward before the step
    opt.step()
    assert a.grad is fresh and b.grad is not None
    guard.undo(opt)
    nothing_left(opt)


@pytest.mark.parametrize(
    "other, ours, skipped", [(None, 1.0, True), (None, 0.0, False), (0.0, 1.0, True), (1.0, 0.0, True), (0.0, 0.0, False)]
)
def test_a_flag_is_a_found_inf_that_combines_with_anothers(other, ours, skipped):
    opt, a, b = two_params(fused=True)
    weights = [a.detach().clone(), b.detach().clone()]
    first, second = StepGuard(), StepGuard()
    if other is not None:  # another callback's guard flagged the same step first
        first.flag(opt, torch.tensor(other))
    second.flag(opt, torch.tensor(ours))
    assert opt.found_inf.item() == max(other or 0.0, ours)
    if other is not None:
        torch.testing.assert_close(opt.found_inf, torch.maximum(torch.tensor(other), torch.tensor(ours)))
    opt.step()
    assert "found_inf" not in opt.__dict__  # removed right after the step, by whichever guard set the last one
    assert (torch.equal(a, weights[0]) and torch.equal(b, weights[1])) is skipped
    first.undo()
    second.undo()
    nothing_left(opt)


def test_undo_before_the_step_removes_the_flag_and_leaves_anothers():
    opt, *_ = two_params(fused=True)
    guard = StepGuard()
    guard.flag(opt, torch.tensor(1.0))
    guard.undo(opt)
    nothing_left(opt)
    theirs = opt.found_inf = torch.tensor(1.0)  # e.g. a GradScaler's, set after ours
    guard.flag(opt, torch.tensor(0.0))
    opt.found_inf = theirs  # ...which replaced ours
    guard.undo(opt)
    assert opt.found_inf is theirs  # not ours to remove
    del opt.found_inf
    nothing_left(opt)


def test_a_dead_optimizers_record_goes_with_it():
    guard = StepGuard()
    opt, a, b = two_params(fused=True)
    guard.skip(opt)
    guard.flag(opt, torch.tensor(1.0))
    assert len(guard._records) == 1
    del opt
    gc.collect()
    assert len(guard._records) == 0


def test_takes_found_inf_only_where_a_skipped_step_changes_nothing():
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    assert takes_found_inf(torch.optim.Adam([p], fused=True)) and takes_found_inf(torch.optim.AdamW([p], fused=True))
    assert takes_found_inf(torch.optim.SGD([p], lr=0.1, fused=True))
    assert not takes_found_inf(torch.optim.Adam([p]))
    assert not takes_found_inf(torch.optim.SGD([p], lr=0.1, foreach=True))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    assert not takes_found_inf(sgd)  # no momentum buffer yet
    sgd.step()
    assert takes_found_inf(sgd)
    q = nn.Parameter(torch.ones(3))
    sgd.add_param_group({"params": [q]})
    assert takes_found_inf(sgd)  # q has no gradient: the step passes over it
    q.grad = torch.ones(3)
    assert not takes_found_inf(sgd)  # the new group's first step


# ============================================================================ C. the grid
STEPS, EVENT = 4, 2  # four steps; the first optimizer's step 2 is the one skipped
LR, MAX_NORM, SKIP_ABOVE, SPIKE = 0.1, 0.5, 100.0, 1e6
KINDS = ["sgd", "sgd-foreach", "adam-fused", "adamw-fused", "sgd-fused", "sgd-fused-momentum", "group-added"]
FUSED = {"adam-fused", "adamw-fused", "sgd-fused", "sgd-fused-momentum", "group-added"}
MOMENTUM_FUSED = {"sgd-fused-momentum", "group-added"}
REASONS = ["nonfinite", "skip_above", "zclip", "none"]
INIT_SCALE = 2.0**16  # GradScaler's default


def make_optimizer(kind: str, params: list[Tensor]) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, foreach=False)
    if kind == "sgd-foreach":
        return torch.optim.SGD(params, lr=LR, momentum=0.9, foreach=True)
    if kind in ("adam-fused", "adamw-fused"):
        return (torch.optim.Adam if kind == "adam-fused" else torch.optim.AdamW)(params, lr=LR, fused=True)
    return torch.optim.SGD(params, lr=LR, momentum=0.0 if kind == "sgd-fused" else 0.9, fused=True)


def make_callback(reason: str, max_norm: float = MAX_NORM, include: Optional[list[str]] = None):
    if reason == "zclip":
        # warm-up on steps 0 and 1, then step 2's spike has z ~ 1e6: skipped; normal steps stay far below
        return ZClip(warmup_steps=2, max_norm=None, z_thresh=50.0, skip_step_z_thresh=1e3, include=include)
    return ClipByGlobalNorm(max_norm, skip_above=SKIP_ABOVE if reason == "skip_above" else None, include=include)


class GradTimes(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (``inf``: non-finite, ``1e6``: a spike)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


class Net(nn.Module):
    """``enc`` (the first optimizer's own), ``mid`` (shared when shared), ``head``; ``extra`` joins at step 2
    in a new param group of the first optimizer (``group-added``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.mid, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 1)
        self.extra = nn.Parameter(torch.full((1,), 0.1))
        self.factor, self.extra_on = 1.0, False

    def forward(self, x: Tensor) -> Tensor:
        w = self.enc.weight if self.factor == 1.0 else GradTimes.apply(self.enc.weight, self.factor)
        h = torch.tanh(self.mid(torch.tanh(nn.functional.linear(x, w, self.enc.bias))))
        out = self.head(h).float()
        return out + self.extra if self.extra_on else out


def batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    # growing inputs: the gradient norms differ from step to step (ZClip's warm-up variance is not ~0)
    return [(torch.randn(8, 4, generator=g) * (1.0 + k), torch.randn(8, 1, generator=g) * 0.1) for k in range(STEPS)]


@dataclass(frozen=True)
class Cell:
    kind: str
    scaler: bool
    reason: str
    sharing: str  # "alone", "shared" (one callback clips both optimizers), "first" (shared, the first clipped only)

    @property
    def id(self) -> str:
        return f"{self.kind}-{'fp16' if self.scaler else 'fp32'}-{self.reason}-{self.sharing}"

    @property
    def shared(self) -> bool:
        return self.sharing != "alone"

    @property
    def clipped(self) -> tuple[int, ...]:
        """The optimizers the callback clips (in a Trainer: those with a selected parameter)."""
        return (0, 1) if self.sharing == "shared" else (0,)

    def selected(self, name: str) -> bool:
        """Whether the callback takes parameter ``name`` (``include=["*enc.*"]`` for ``"first"``)."""
        return self.sharing != "first" or name.startswith("enc.")

    def callback(self):
        return make_callback(self.reason, self.max_norm, include=["*enc.*"] if self.sharing == "first" else None)

    @property
    def max_norm(self) -> float:
        return MAX_NORM / 5 if self.sharing == "first" else MAX_NORM  # `enc` alone has smaller gradients

    def optimizers(self, net: Net) -> list[torch.optim.Optimizer]:
        if not self.shared:
            return [make_optimizer(self.kind, [*net.enc.parameters(), *net.mid.parameters(), *net.head.parameters()])]
        return [make_optimizer(self.kind, [*net.enc.parameters(), *net.mid.parameters()]),
                torch.optim.SGD([*net.mid.parameters(), *net.head.parameters()], lr=LR, foreach=False)]  # fmt: skip

    def prepare(self, net: Net, first: torch.optim.Optimizer, k: int) -> None:
        """Before step ``k``'s forward: the event of step 2, and the new param group."""
        net.factor = (INF if self.reason == "nonfinite" else SPIKE) if k == EVENT and self.reason != "none" else 1.0
        if self.kind == "group-added" and k == EVENT:
            first.add_param_group({"params": [net.extra]})
            net.extra_on = True

    def on_device(self, loop: str, k: int) -> bool:
        """Whether the first optimizer's step ``k`` is decided on the device (a ``found_inf``, nothing read)."""
        if loop == "plain" or self.scaler or self.reason == "zclip" or self.kind not in FUSED:
            return False  # a plain loop may have a GradScaler of its own; ZClip reads the norm
        if self.kind in MOMENTUM_FUSED and k == 0:
            return False  # no momentum buffer before the first step
        if self.kind == "group-added" and (k == EVENT or (k > EVENT and self.reason != "none")):
            return False  # the new group has no momentum buffer until its first step runs
        return True


SHARING = ["alone", "shared", "first"]
CELLS = [Cell(*values) for values in itertools.product(KINDS, [False, True], REASONS, SHARING)]


def marks(cell: Cell, loop: str) -> list:
    if cell.shared and cell.scaler:
        return [pytest.mark.skip(reason="GradScaler.unscale_ divides a parameter shared by two optimizers once per "
                                        "optimizer (torch): no loop steps the second with its true gradient")]  # fmt: skip
    if cell.kind == "group-added" and cell.scaler and cell.reason == "nonfinite" and loop != "plain":
        # (in a plain loop the callback cannot see the GradScaler: it hides the gradients, the step passes over them)
        return [pytest.mark.xfail(strict=True, reason="the GradScaler skips the new group's first step on the device: "
                                  "torch's fused SGD has made its momentum buffers with empty_like (warned at fit start)")]  # fmt: skip
    return []


PLAIN_CELLS = [pytest.param(c, id=c.id, marks=marks(c, "plain")) for c in CELLS]
FABRIC_CELLS = [pytest.param(c, id=c.id, marks=marks(c, "fabric")) for c in CELLS]
TRAINER_CELLS = [pytest.param(c, id=c.id, marks=marks(c, "trainer")) for c in CELLS]


# ---------------------------------------------------------------------- what a cell records
@dataclass
class StepRecord:
    """One optimizer's step: gradients before and after the callback, weights and state around the step."""

    pre: dict = field(default_factory=dict)
    pre_scale: float = 1.0  # the loss scale still on ``pre``
    post: dict = field(default_factory=dict)
    post_scale: float = 1.0
    flag: Optional[Tensor] = None  # the ``found_inf`` the optimizer holds when its step begins
    w_before: dict = field(default_factory=dict)
    s_before: Any = None
    w_after: dict = field(default_factory=dict)
    s_after: Any = None
    g_after: dict = field(default_factory=dict)
    left: bool = False  # a ``found_inf`` still on the optimizer after its step


class Recorder:
    def __init__(self, net: Net, scaler: Optional[torch.amp.GradScaler]) -> None:
        self.names = {id(p): n for n, p in net.named_parameters()}
        self.scaler = scaler
        self.opts: list[torch.optim.Optimizer] = []
        self.k = 0
        self.steps: dict[tuple[int, int], StepRecord] = {}

    def _params(self, opt):
        return [p for g in opt.param_groups for p in g["params"]]

    def _grads(self, opt):
        return {self.names[id(p)]: None if p.grad is None else p.grad.detach().clone() for p in self._params(opt)}

    def _scale(self, opt) -> float:
        if self.scaler is None or self.scaler._per_optimizer_states[id(opt)]["stage"] is not OptState.READY:
            return 1.0
        return self.scaler.get_scale()

    def _rec(self, opt) -> StepRecord:
        i = next(i for i, o in enumerate(self.opts) if o is opt)
        return self.steps.setdefault((self.k, i), StepRecord())

    def before_clip(self, opt) -> None:
        r = self._rec(opt)
        r.pre, r.pre_scale = self._grads(opt), self._scale(opt)
        r.w_before = {self.names[id(p)]: p.detach().clone() for p in self._params(opt)}
        r.s_before = copy.deepcopy(opt.state_dict())

    def after_clip(self, opt) -> None:
        r = self._rec(opt)
        r.post, r.post_scale = self._grads(opt), self._scale(opt)
        flag = opt.__dict__.get("found_inf")
        r.flag = None if flag is None else flag.detach().clone()

    def after_step(self, opt) -> None:
        r = self._rec(opt)
        r.w_after = {self.names[id(p)]: p.detach().clone() for p in self._params(opt)}
        r.s_after = copy.deepcopy(opt.state_dict())
        r.g_after = self._grads(opt)
        r.left = "found_inf" in opt.__dict__


@dataclass
class Run:
    rec: Recorder
    cb: Any
    opts: list
    warnings: list[str]
    scale: Optional[float]  # the scaler's scale at the end
    returned: dict = field(default_factory=dict)  # a loop's metrics returned at its last step, per optimizer
    logged: list = field(default_factory=list)  # a Trainer's metrics written at each step
    trainer: bool = False


# ---------------------------------------------------------------------- the loops
def run_plain(cell: Cell) -> Run:
    net = Net()
    opts = cell.optimizers(net)
    scaler = torch.amp.GradScaler("cpu") if cell.scaler else None
    rec, cb = Recorder(net, scaler), cell.callback()
    rec.opts, returned = opts, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, (x, y) in enumerate(batches()):
            rec.k = k
            cell.prepare(net, opts[0], k)
            for opt in opts:
                opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=cell.scaler):
                loss = nn.functional.mse_loss(net(x), y)
            (scaler.scale(loss) if scaler else loss).backward()
            for i, opt in enumerate(opts):
                if scaler:
                    scaler.unscale_(opt)
                rec.before_clip(opt)
                if i in cell.clipped:
                    metrics = cb.clip_gradients(net, opt, metrics=k == STEPS - 1)
                rec.after_clip(opt)
                scaler.step(opt) if scaler else opt.step()
                rec.after_step(opt)
                if k == STEPS - 1 and i in cell.clipped:
                    returned[i] = metrics
            if scaler:
                scaler.update()
    return Run(rec, cb, opts, [str(w.message) for w in caught], scaler.get_scale() if scaler else None, returned)


def run_fabric(cell: Cell) -> Run:
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    # `Fabric(precision="16-mixed", accelerator="cpu")` falls back to bf16-mixed, with no scaler: the plugin is given
    plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))] if cell.scaler else None
    fabric = Fabric(accelerator="cpu", devices=1, plugins=plugins)
    scaler = getattr(fabric.strategy.precision, "scaler", None)
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() if cell.scaler else scaler is None
    net = Net()
    inner = cell.optimizers(net)
    model, *opts = fabric.setup(net, *inner)
    rec, cb = Recorder(net, scaler), cell.callback()
    rec.opts, returned = inner, {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, (x, y) in enumerate(batches()):
            rec.k = k
            cell.prepare(net, inner[0], k)
            for opt in opts:
                opt.zero_grad()
            fabric.backward(nn.functional.mse_loss(model(x), y))
            for i, (opt, raw) in enumerate(zip(opts, inner)):
                rec.before_clip(raw)
                if i in cell.clipped:
                    metrics = cb.clip_gradients(model, opt, fabric=fabric, metrics=k == STEPS - 1)
                rec.after_clip(raw)
                opt.step()
                rec.after_step(raw)
                if k == STEPS - 1 and i in cell.clipped:
                    returned[i] = metrics
    return Run(rec, cb, inner, [str(w.message) for w in caught], scaler.get_scale() if scaler else None, returned)


class MemoryLogger(pl.loggers.Logger):
    name, version = "memory", 0

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs):
        pass


class Probe(pl.Callback):
    """Before the callback (``first``): the gradients, weights and state; after it: what the step will see."""

    def __init__(self, rec: Recorder, first: bool) -> None:
        self.rec, self.first = rec, first

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rec.k = batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        (self.rec.before_clip if self.first else self.rec.after_clip)(optimizer)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.first and pl_module.automatic_optimization:  # before the callback's own batch end
            self.rec.after_step(trainer.optimizers[0])


class Lit(pl.LightningModule):
    def __init__(self, cell: Cell, rec: Recorder, net: Net) -> None:
        super().__init__()
        self.cell, self.rec, self.net = cell, rec, net
        self.automatic_optimization = not cell.shared

    def configure_optimizers(self):
        self.rec.opts = self.cell.optimizers(self.net)
        return self.rec.opts

    def training_step(self, batch, batch_idx):
        self.rec.k = batch_idx
        self.cell.prepare(self.net, self.rec.opts[0], batch_idx)
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(loss)
        for opt, raw in zip(opts, self.rec.opts):
            opt.step()
            self.rec.after_step(raw)


def run_trainer(cell: Cell, tmp_path) -> Run:
    from pytorch_lightning.plugins.precision import MixedPrecision

    net = Net()
    scaler = torch.amp.GradScaler("cpu") if cell.scaler else None
    rec, cb, logger = Recorder(net, scaler), cell.callback(), MemoryLogger()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=STEPS,
        logger=logger, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Probe(rec, True), cb, Probe(rec, False)],
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)] if scaler else None,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Lit(cell, rec, net), torch.utils.data.DataLoader(batches(), batch_size=None))
    logged = [{k: v for k, v in call.items() if k.startswith("grad_clip/")} for call in logger.calls]
    return Run(rec, cb, rec.opts, [str(w.message) for w in caught], scaler.get_scale() if scaler else None,
               logged=[m for m in logged if m], trainer=True)  # fmt: skip


# ---------------------------------------------------------------------- the one check
def true(grads: dict, scale: float) -> dict:
    """The gradients without the loss scale still on them (a power of two: exact)."""
    return {n: None if g is None else g * (1.0 / scale) for n, g in grads.items()}


def norm64(grads: dict) -> float:
    return torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads.values() if g is not None])).item()


def assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        assert (a[n] is None) == (b[n] is None), (what, n)
        if a[n] is not None:
            assert torch.equal(a[n], b[n]) or torch.allclose(a[n], b[n], rtol=0, atol=0, equal_nan=True), (what, n)


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a["param_groups"] == b["param_groups"], what
    assert a["state"].keys() == b["state"].keys(), (what, a["state"].keys(), b["state"].keys())
    for i, sa in a["state"].items():
        sb = b["state"][i]
        assert sa.keys() == sb.keys(), (what, i)
        for k, v in sa.items():
            assert torch.equal(v, sb[k]) if isinstance(v, Tensor) else v == sb[k], (what, i, k)


def check_cell(cell: Cell, loop: str, run: Run) -> None:
    # the callback knows the Trainer's and Fabric's scaler; a plain loop's own GradScaler it cannot see, and a
    # non-finite step there is skipped by both (the gradients hidden, and the scaler's found_inf)
    knows_scaler = cell.scaler and loop != "plain"
    # warnings: a non-finite step skipped by the callback is warned about (once), one the scaler skips is not;
    # fused SGD with momentum under a scaler the callback knows is warned about (at fit start, or the first call)
    nonfinite_warned = sum("non-finite gradients found, skipping the optimizer step" in w for w in run.warnings)
    assert nonfinite_warned == (cell.reason == "nonfinite" and not knows_scaler), run.warnings
    momentum_warned = any("fused SGD with momentum leaves its momentum buffers" in w for w in run.warnings)
    assert momentum_warned == (knows_scaler and cell.kind in MOMENTUM_FUSED), run.warnings
    if cell.scaler:  # the scaler saw the overflow, and nothing else
        assert run.scale == INIT_SCALE * (0.5 if cell.reason == "nonfinite" else 1.0)

    n_opts = 2 if cell.shared else 1
    clipped = {i: [] for i in cell.clipped}  # per optimizer, whether each step that ran was clipped
    for k in range(STEPS):
        for i in range(n_opts):
            r = run.rec.steps[(k, i)]
            where = f"step {k}, optimizer {i}"
            assert not r.left, f"{where}: a found_inf outlived the step"
            pre, post = true(r.pre, r.pre_scale), true(r.post, r.post_scale)
            skipped = i == 0 and k == EVENT and cell.reason != "none"
            ours = skipped and not (cell.reason == "nonfinite" and knows_scaler)  # the callback's, not the scaler's
            # a GradScaler that finds an inf calls no `step()` of a non-fused optimizer: no post-hook puts the
            # hidden gradients back (the next call drops them: new gradients have come)
            stepped = not (skipped and cell.scaler and cell.reason == "nonfinite" and cell.kind not in FUSED)
            device = i == 0 and cell.on_device(loop, k)
            # the path: on the device a found_inf of 0 or 1 (gradients there), on the host hidden gradients or none
            if device:
                assert r.flag is not None and r.flag.item() == float(ours), where
            else:
                assert r.flag is None, where
            if skipped:
                assert_equal(r.w_after, r.w_before, f"{where}: weights across the skipped step")
                assert_same_state(r.s_after, r.s_before, f"{where}: optimizer state across the skipped step")
            else:
                assert any(not torch.equal(r.w_after[n], r.w_before[n]) for n in r.w_before), f"{where}: the step ran"
            if ours:
                # a Trainer hides the gradients at once (its hook runs inside `step()`); a loop when the step
                # begins (a step pre-hook: another optimizer may be clipped first, a scaler's skip takes none)
                if device or not run.trainer:
                    assert_equal(post, pre, f"{where}: a skipped step's gradients are not scaled")
                else:
                    assert all(g is None for g in r.post.values()), f"{where}: hidden from the step"
                if stepped or not run.trainer:
                    assert_equal(r.g_after, pre, f"{where}: the gradients, there after the step")
                else:
                    assert all(g is None for g in r.g_after.values()), f"{where}: still hidden"
            if not skipped:
                assert all(g is not None for g in post.values()), where
            if not skipped and i not in cell.clipped:
                assert_equal(post, pre, f"{where}: no callback clips this optimizer")
            elif not skipped:  # clipped, or left bit for bit; what the callback does not select is left
                others = [n for n in pre if not cell.selected(n)]
                assert_equal({n: post[n] for n in others}, {n: pre[n] for n in others}, f"{where}: not selected")
                pre, post = ({n: g for n, g in d.items() if cell.selected(n)} for d in (pre, post))
                n_pre, n_post = norm64(pre), norm64(post)
                was = any(not torch.equal(post[n], pre[n]) for n in pre)
                if isinstance(run.cb, ClipByGlobalNorm):
                    assert was == (n_pre > cell.max_norm), (where, n_pre)
                    assert n_post <= cell.max_norm * (1 + 1e-5), (where, n_post)
                if was:
                    for n in pre:
                        torch.testing.assert_close(post[n], pre[n] * (n_post / n_pre), rtol=1e-5, atol=1e-7)
                    if isinstance(run.cb, ClipByGlobalNorm):
                        assert n_post == pytest.approx(cell.max_norm, rel=1e-5), where
                else:
                    assert_equal(post, pre, f"{where}: not clipped")
                clipped[i].append(was)
            if i == 1:  # the second optimizer steps with the shared parameter's gradient as the first left it
                first = run.rec.steps[(k, 0)]
                left = first.pre if all(g is None for g in first.post.values()) else first.post  # hidden: put back
                for n in ("mid.weight", "mid.bias"):
                    assert torch.equal(r.pre[n], left[n]), f"{where}: {n}, the shared gradient"
                for n, w in r.w_before.items():  # plain SGD: w - lr * g, with the gradient after its own clipping
                    assert torch.equal(r.w_after[n], w.add(r.post[n], alpha=-LR)), f"{where}: {n} stepped"

    # the counts: checkpointed tallies, and the metrics returned (loops) or written (Trainer)
    tallies = run.cb.state_dict()["tallies"]
    assert set(tallies) == set(cell.clipped)
    counts_skips = cell.reason in ("skip_above", "zclip")
    if run.trainer:  # the second optimizer, where none of its parameters is selected, has no metrics
        assert all(not k.startswith("grad_clip/opt1/") for m in run.logged for k in m) == (1 not in cell.clipped)
    for i in cell.clipped:
        nonfinite = int(i == 0 and cell.reason == "nonfinite")
        skips = int(i == 0 and counts_skips)
        ran = STEPS - nonfinite - skips
        t = tallies[i]
        assert (t["steps"], t["finite"], t["skipped"], t["ran"], t["clipped"]) == (
            STEPS, STEPS - nonfinite, skips, ran, sum(clipped[i])), (i, t)  # fmt: skip
        assert len(clipped[i]) == ran
        assert t["streak"] == 0
        if run.trainer:
            prefix = "grad_clip/" if n_opts == 1 else f"grad_clip/opt{i}/"
            assert len(run.logged) == STEPS, run.logged
            ran_at = [k for k in range(STEPS) if not (i == 0 and k == EVENT and cell.reason != "none")]
            for k, m in enumerate(run.logged):
                assert m[prefix + "nonfinite_steps"] == (nonfinite if k >= EVENT else 0), (k, m)
                if counts_skips:
                    assert m[prefix + "skipped_steps"] == (skips if k >= EVENT else 0), (k, m)
                else:
                    assert prefix + "skipped_steps" not in m
                rate = m.get(prefix + "clip_rate")  # of this step alone; NaN (not written) where none ran
                assert rate == (float(clipped[i][ran_at.index(k)]) if k in ran_at else None), (k, m)
        else:
            m = run.returned[i]  # over every step: `metrics=False` before the last
            assert m["grad_clip/nonfinite_steps"] == nonfinite, m
            assert m["grad_clip/skipped_steps"] == skips if counts_skips else "grad_clip/skipped_steps" not in m, m
            assert m["grad_clip/clip_rate"] == pytest.approx(sum(clipped[i]) / ran), m
    if isinstance(run.cb, ClipByGlobalNorm):
        assert 0 < sum(map(sum, clipped.values())), "the grid clips somewhere"

    # nothing left on the optimizers
    for opt in run.opts:
        assert "found_inf" not in opt.__dict__
        if run.trainer:
            assert len(opt._optimizer_step_post_hooks) == 0
        else:  # a loop has no batch end: the last step's hook (its record emptied) goes at the next call
            assert len(opt._optimizer_step_post_hooks) <= 1
    assert all(torch.isfinite(w).all() for r in run.rec.steps.values() for w in r.w_after.values())


@pytest.mark.parametrize("cell", PLAIN_CELLS)
def test_grid_plain_loop(cell):
    check_cell(cell, "plain", run_plain(cell))


@pytest.mark.parametrize("cell", FABRIC_CELLS)
def test_grid_fabric_loop(cell):
    check_cell(cell, "fabric", run_fabric(cell))


@pytest.mark.parametrize("cell", TRAINER_CELLS)
def test_grid_trainer(cell, tmp_path):
    check_cell(cell, "trainer", run_trainer(cell, tmp_path))


# ============================================================================ D. failures and folds
class Raises(pl.Callback):
    """After the clipping callback: raises in ``on_before_optimizer_step`` at batch ``at``."""

    def __init__(self, at: int) -> None:
        self.at, self.batch = at, -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.batch == self.at:
            raise RuntimeError("a later callback fails")


class FailingLit(pl.LightningModule):
    """Step 2's gradients are non-finite (skipped); ``training_step`` raises at batch ``fail_at``."""

    def __init__(self, kind: str, fail_at: Optional[int]) -> None:
        super().__init__()
        self.net, self.kind, self.fail_at = Net(), kind, fail_at
        self.rec = Recorder(self.net, None)

    def configure_optimizers(self):
        self.rec.opts = [make_optimizer(self.kind, list(self.net.parameters()))]
        return self.rec.opts[0]

    def training_step(self, batch, batch_idx):
        if batch_idx == self.fail_at:
            raise RuntimeError("training_step fails")
        self.net.factor = INF if batch_idx == EVENT else 1.0
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


@pytest.mark.parametrize("where", ["later-callback-at-the-skip", "training_step-after-the-skip"])
@pytest.mark.parametrize("kind", ["sgd", "adam-fused"], ids=["host-skip", "device-skip"])
def test_a_fit_that_raises_leaves_nothing_on_the_optimizer(tmp_path, kind, where):
    model = FailingLit(kind, fail_at=EVENT + 1 if where.startswith("training_step") else None)
    rec = model.rec
    callbacks = [Probe(rec, True), ClipByGlobalNorm(MAX_NORM), Probe(rec, False)]
    if where.startswith("later"):
        callbacks.append(Raises(EVENT))
    trainer = pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=STEPS,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="fails"):
            trainer.fit(model, torch.utils.data.DataLoader(batches(), batch_size=None))
    (opt,) = rec.opts
    nothing_left(opt)
    if where.startswith("later"):  # the skip was decided, its step never ran
        r = rec.steps[(EVENT, 0)]
        assert r.flag is None if kind == "sgd" else r.flag.item() == 1.0  # on the host, or on the device
        if kind == "sgd":
            assert all(g is None for g in r.post.values())  # hidden...
        grads = {n: p.grad for n, p in model.net.named_parameters()}
        assert_equal(grads, r.pre, "the gradients, put back on failure")


@pytest.mark.parametrize("kinds", [("sgd",), ("sgd", "adam-fused")], ids=["sgd", "sgd-and-fused-adam"])
def test_one_callback_clips_every_fold_of_a_plain_loop(kinds):
    # a new model and optimizer per fold, the old ones deleted: a new optimizer often gets the address of a
    # dead one, and must never find its plan (parameters of the dead model), its record or its index
    cb = ClipByGlobalNorm(MAX_NORM)
    x, y = torch.randn(8, 4) * 10, torch.randn(8, 1)
    gc.freeze()  # what exists now is not the folds' garbage: each collection below scans the folds' objects only
    try:
        run_folds(cb, kinds, x, y)
    finally:
        gc.unfreeze()
    assert len(cb._guard._records) == 0  # the dead optimizers took their records along


def run_folds(cb, kinds, x, y) -> None:
    for fold in range(20):
        torch.manual_seed(fold)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
        opt = make_optimizer(kinds[fold % len(kinds)], list(net.parameters()))
        for _ in range(2):
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            pre = norm64({n: p.grad for n, p in net.named_parameters()})
            assert pre > MAX_NORM
            metrics = cb.clip_gradients(net, opt)
            post = norm64({n: p.grad for n, p in net.named_parameters()})
            assert post == pytest.approx(MAX_NORM, rel=1e-5), fold
            assert metrics["grad_clip/norm"] == pytest.approx(pre, rel=1e-5), fold
            assert metrics["grad_clip/clip_rate"] == 1.0
            opt.step()
            assert "found_inf" not in opt.__dict__
        del net, opt
        gc.collect()


def test_clipping_two_optimizers_before_stepping_either_keeps_the_shared_gradient():
    # a plain loop may clip every optimizer first, then step them: a host skip of the first must not hide a
    # parameter it shares from the second's clipping (nor from its step)
    net = Net()
    first = torch.optim.SGD([*net.enc.parameters(), *net.mid.parameters()], lr=LR, foreach=False)
    second = torch.optim.SGD([*net.mid.parameters(), *net.head.parameters()], lr=LR, foreach=False)
    cb = ClipByGlobalNorm(MAX_NORM)
    x, y = batches()[1]
    net.factor = INF  # the first optimizer's own `enc.weight`: non-finite
    nn.functional.mse_loss(net(x), y).backward()
    true_grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.warns(UserWarning, match="skipping the optimizer step"):
        cb.clip_gradients(net, first)
    metrics = cb.clip_gradients(net, second)
    first.step()
    second.step()
    theirs = {n: true_grads[n] for n in ("mid.weight", "mid.bias", "head.weight", "head.bias")}
    norm = norm64(theirs)
    assert metrics["grad_clip/norm"] == pytest.approx(norm, rel=1e-5)  # the shared gradient measured too
    coef = min(1.0, MAX_NORM / norm)
    for n, g in theirs.items():  # the second steps with its clipped gradients, the shared one included
        torch.testing.assert_close(dict(net.named_parameters())[n].detach(), weights[n] - LR * g * coef)
    for n in ("enc.weight", "enc.bias"):
        assert torch.equal(dict(net.named_parameters())[n], weights[n])
