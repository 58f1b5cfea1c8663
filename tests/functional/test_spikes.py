"""``spike_update`` against OLMo-core's ``SkipStepOptimizer.get_step_factor`` (``ai2-olmo-core``), on
recorded sequences of losses and gradient norms with spikes, a NaN and an inf."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip_plugin.functional.adaptive import SpikeWindow, spike_update

olmo = pytest.importorskip("olmo_core.optim.skip_step_optimizer", reason="the reference: pip install ai2-olmo-core==3.0.0")


class _Reference(olmo.SkipStepOptimizer):
    """OLMo-core's decision alone: its ``get_step_factor`` over the values it is given."""

    def __init__(self, window: int, sigma: float) -> None:
        super().__init__([torch.zeros(1)], {}, rolling_interval_length=window, sigma_factor=sigma)

    def skips(self, loss: float, norm: float | None) -> bool:
        self.latest_loss = torch.tensor(loss)
        if norm is not None:
            self.latest_grad_norm = torch.tensor(norm)
        return bool(self.step_skipped)


def sequence(n: int, seed: int, spikes: dict[int, float]) -> list[tuple[float, float]]:
    """A decaying loss and a noisy norm, as a training run records them, with ``spikes`` (step: factor)."""
    g = torch.Generator().manual_seed(seed)
    loss = (3.0 * torch.exp(-torch.arange(n) / 200) + 0.05 * torch.randn(n, generator=g)).tolist()
    norm = (1.0 + 0.1 * torch.randn(n, generator=g)).abs().tolist()
    for step, factor in spikes.items():
        loss[step] *= factor if step % 2 else 1.0
        norm[step] *= factor
    return list(zip(loss, norm))


def decisions(values: list[tuple[float, float]], window: int, sigma: float, watch: str) -> list[bool]:
    state, out = None, []
    for loss, norm in values:
        x = torch.tensor({"loss": [loss], "norm": [norm], "both": [loss, norm]}[watch])
        state, skip, _ = spike_update(state, x, window=window, sigma=sigma)
        out.append(bool(skip))
    return out


def reference(values: list[tuple[float, float]], window: int, sigma: float, watch: str) -> list[bool]:
    ref = _Reference(window, sigma)
    if watch == "norm":  # OLMo-core always watches the loss: give it a constant one, never a spike
        return [ref.skips(1.0, norm) for _, norm in values]
    return [ref.skips(loss, norm if watch == "both" else None) for loss, norm in values]


@pytest.mark.parametrize("window, sigma", [(128, 6.0), (16, 3.0), (6, 2.0), (7, 6.0)])
@pytest.mark.parametrize("watch", ["loss", "both"])
def test_finite_values_take_olmo_cores_decisions_step_by_step(window, sigma, watch):
    values = sequence(600, seed=window, spikes={71: 40.0, 150: 30.0, 251: 30.0, 401: 60.0, 403: 1.5})
    ours, ref = decisions(values, window, sigma, watch), reference(values, window, sigma, watch)
    assert ours == ref
    assert 3 <= sum(ours) < len(ours) // 4  # the spikes are found, and not every step


@pytest.mark.parametrize("window, sigma", [(128, 6.0), (10, 3.0)])
def test_watching_the_norm_takes_olmo_cores_decisions_with_a_constant_loss(window, sigma):
    # OLMo-core's std of a constant loss is 0 and 1.0 - 1.0 <= 0 holds: it decides on the norms alone
    values = sequence(400, seed=3, spikes={90: 30.0, 200: 80.0})
    assert decisions(values, window, sigma, "norm") == reference(values, window, sigma, "norm")
    assert sum(decisions(values, window, sigma, "norm")) >= 2


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("column", [0, 1])
def test_a_nonfinite_value_skips_its_step_and_the_rest_decide_as_if_it_had_not_been_there(bad, column):
    values = sequence(300, seed=1, spikes={150: 40.0, 220: 9.0})
    poisoned = [list(v) for v in values]
    poisoned.insert(100, list(values[99]))
    poisoned[100][column] = bad
    ours = decisions([tuple(v) for v in poisoned], 32, 4.0, "both")
    assert ours[100] is True  # skipped
    assert ours[:100] + ours[101:] == reference(values, 32, 4.0, "both")  # as if absent
    assert sum(ours) >= 3
    # OLMo-core's own window is poisoned: it skips every step that follows
    assert all(reference([tuple(v) for v in poisoned], 32, 4.0, "both")[100:133])


def test_record_false_keeps_a_step_out_of_the_window():
    state, _, _ = spike_update(None, torch.tensor([1.0, 2.0]), window=4, sigma=6.0)
    kept, skip, _ = spike_update(state, torch.tensor([5.0, 6.0]), window=4, sigma=6.0, record=torch.tensor(False))
    assert torch.equal(kept.values, state.values) and int(kept.count) == 1 and not bool(skip)


def test_the_window_holds_the_last_values_oldest_first_and_limits_are_mean_plus_sigma_std():
    state = None
    for v in range(1, 8):
        state, _, limits = spike_update(state, torch.tensor([float(v)]), window=4, sigma=2.0)
    assert state.values.flatten().tolist() == [4.0, 5.0, 6.0, 7.0] and int(state.count) == 4
    prev = torch.tensor([3.0, 4.0, 5.0, 6.0])  # the window before the last value entered
    std, mean = torch.std_mean(prev)
    torch.testing.assert_close(limits, (mean + 2.0 * std).reshape(1))
    fresh, _, limits = spike_update(None, torch.tensor([1.0]), window=4, sigma=2.0)
    assert math.isnan(limits.item()) and isinstance(fresh, SpikeWindow)


def test_nothing_is_read_to_the_host(monkeypatch):
    state, _, _ = spike_update(None, torch.tensor([1.0, 1.0]), window=8, sigma=6.0)
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: pytest.fail("read to the host"))
    for _ in range(10):
        state, skip, limits = spike_update(state, torch.tensor([1.0, 1.1]), window=8, sigma=6.0)


@pytest.mark.parametrize("value", [0.3, 1.0 / 3.0, 2.5e-4])
def test_a_constant_window_has_std_zero_as_torch_std_mean_gives(value):
    """A constant loss: torch's std_mean gives std 0 and OLMo-core never skips, even with sigma below 1
    (a mean off by one rounding would give a std of that rounding and skip every step)."""
    assert not any(decisions([(value, value)] * 40, 16, 0.5, "both"))
    assert not any(reference([(value, value)] * 40, 16, 0.5, "both"))


def test_values_equal_to_six_digits_take_olmo_cores_decisions():
    """Near-ties: the bound within float32 roundings of the values (a full window takes torch.std_mean, as OLMo-core)."""
    g = torch.Generator().manual_seed(5)
    for _ in range(40):
        values = (1.0 + 1e-6 * torch.randn(120, 2, generator=g)).tolist()
        assert decisions(values, 16, 2.0, "both") == reference(values, 16, 2.0, "both")
