"""Tests for ``gradclip_plugin.functional.clip``.

References: TensorFlow's hand-checked vectors (issue 2), torch's ``clip_grad_norm_`` /
``clip_grad_value_`` / ``get_total_norm``, and the published formulas computed independently.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip_plugin.functional import (
    clip_by_global_norm,
    clip_by_global_norm_,
    clip_by_norm,
    clip_by_norm_,
    clip_by_value,
    clip_by_value_,
    scale_,
)

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
TORCH_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6)


def _exact(actual: torch.Tensor, expected) -> None:
    """Bit-for-bit equality, with the values in the failure message."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected), f"\n{actual!r}\n!=\n{expected!r}"


def _params(seed: int, scale: float, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """Parameters with random gradients of assorted shapes."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in [(), (7,), (5, 4), (2, 3, 6)]:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * scale).to(dtype)
        params.append(p)
    return params


def _grads(params) -> list[torch.Tensor]:
    return [p.grad for p in params]


def _clones(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


# --- hand-checked vectors (issue 2, from TensorFlow and torch) ------------------------------------


def test_vector_3_4_and_0_0_clipped_to_1_all_forms():
    make = lambda: [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])]  # noqa: E731
    expected = [[0.6, 0.8], [0.0, 0.0]]

    out, norm = clip_by_global_norm(make(), 1.0)
    _exact(norm, 5.0)
    for o, e in zip(out, expected):
        _exact(o, e)

    ts = make()
    _exact(clip_by_global_norm_(ts, 1.0), 5.0)
    for t, e in zip(ts, expected):
        _exact(t, e)

    ts = make()  # per tensor: the zero tensor stays zero (no 0/0)
    _exact(clip_by_norm_(ts, 1.0), [5.0, 0.0])
    for t, e in zip(ts, expected):
        _exact(t, e)

    for t, e in zip(make(), expected):
        _exact(clip_by_norm(t, 1.0), e)
    _exact(clip_by_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 1.0), expected)
    # With one norm per row, the all-zero row is returned unchanged, not NaN.
    _exact(clip_by_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), 1.0, axes=[1]), expected)


def test_vector_3_4_with_clip_5_is_unchanged_bit_for_bit_all_forms():
    x = torch.tensor([3.0, 4.0])
    _exact(clip_by_norm(x, 5.0), x)
    out, norm = clip_by_global_norm([x], 5.0)
    _exact(out[0], x)
    _exact(norm, 5.0)
    for clip_ in (clip_by_norm_, clip_by_global_norm_):
        t = x.clone()
        clip_([t], 5.0)
        _exact(t, x)
    # torch's epsilon shrinks a gradient sitting exactly at the threshold; ours must not.
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_([p], 5.0)
    assert not torch.equal(p.grad, x)


def test_tiny_vector_at_its_own_norm_is_unchanged_bit_for_bit():
    x = torch.tensor([1e-6])
    _exact(clip_by_norm(x, 1e-6), x)
    out, _ = clip_by_global_norm([x], 1e-6)
    _exact(out[0], x)
    for clip_ in (clip_by_norm_, clip_by_global_norm_):
        t = x.clone()
        clip_([t], 1e-6)
        _exact(t, x)
    # torch's 1e-6 epsilon would halve it: the case that makes the no-epsilon rule matter.
    p = torch.nn.Parameter(torch.zeros(1))
    p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_([p], 1e-6)
    torch.testing.assert_close(p.grad, x / 2, rtol=1e-5, atol=0.0)


def test_clip_by_norm_tensorflow_vector():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    out = clip_by_norm(x, 2.0)
    # TensorFlow's float32 values, bit for bit.
    _exact(out, [[0.26967996, 0.5393599, 0.80903983, 1.0787199, 1.3483998]])
    # And the formula in float64: x * 2 / sqrt(55).
    torch.testing.assert_close(out.double(), x.double() * 2.0 / math.sqrt(55.0), rtol=1e-7, atol=0.0)


def test_clip_by_norm_tensorflow_vector_with_axes():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_by_norm(x, 1.0, axes=[1])
    _exact(out, [[0.6, 0.8], [0.3, 0.4]])
    # axes=None takes one norm over everything: sqrt(25.25) > 1, so both rows shrink.
    torch.testing.assert_close(clip_by_norm(x, 1.0).double(), x.double() / math.sqrt(25.25), rtol=1e-6, atol=0.0)


def test_global_clip_of_3_minus_4_with_inf_norm():
    t = torch.tensor([3.0, -4.0])
    _exact(clip_by_global_norm_([t], 1.0, norm_type=math.inf), 4.0)
    _exact(t, [0.75, -1.0])


def test_global_clip_of_3_minus_4_with_1_norm():
    t = torch.tensor([3.0, -4.0])
    _exact(clip_by_global_norm_([t], 1.0, norm_type=1.0), 7.0)
    torch.testing.assert_close(t, torch.tensor([0.428571, -0.571428]), rtol=0.0, atol=1e-6)
    torch.testing.assert_close(t.double(), torch.tensor([3.0, -4.0], dtype=torch.float64) / 7.0, rtol=1e-7, atol=0.0)


def test_clip_by_value_tensorflow_vector():
    x = torch.tensor([[-10.0, -1.0, 0.0], [0.0, 2.0, 10.0]])
    expected = [[-1.0, -1.0, 0.0], [0.0, 1.0, 1.0]]
    _exact(clip_by_value(x, -1, 1), expected)
    _exact(clip_by_value(x, torch.tensor(-1.0), torch.tensor(1.0)), expected)
    t = x.clone()
    assert clip_by_value_([t], 1.0) is None
    _exact(t, expected)


# --- clip_by_value / clip_by_value_ ---------------------------------------------------------------


def test_clip_by_value_with_broadcast_tensor_bounds():
    x = torch.tensor([[-10.0, -1.0, 0.0], [0.0, 2.0, 10.0]])
    lo = torch.tensor([[-5.0], [1.0]])
    hi = torch.tensor([[-2.0], [3.0]])
    _exact(clip_by_value(x, lo, hi), [[-5.0, -2.0, -2.0], [1.0, 2.0, 3.0]])


def test_clip_by_value_keeps_input_and_dtype():
    x = torch.tensor([-3.0, 0.5, 3.0], dtype=torch.float16)
    before = x.clone()
    out = clip_by_value(x, -1, 1)
    assert out.dtype == torch.float16
    _exact(x, before)
    _exact(out, [-1.0, 0.5, 1.0])


@pytest.mark.parametrize("clip_value", [0.01, 0.5, 3.0])
def test_clip_by_value_in_place_equals_torch_clip_grad_value(clip_value):
    ours, theirs = _params(20, 1.0), _params(20, 1.0)
    clip_by_value_(_grads(ours), clip_value)
    torch.nn.utils.clip_grad_value_(theirs, clip_value)
    for a, b in zip(ours, theirs):
        _exact(a.grad, b.grad)


def test_clip_by_value_in_place_over_mixed_dtypes():
    ts = [torch.tensor([-3.0, 0.5]), torch.tensor([2.0, -0.25], dtype=torch.float16),
          torch.tensor([7.0], dtype=torch.bfloat16)]
    clip_by_value_([None, *ts, None], 1.0)
    _exact(ts[0], [-1.0, 0.5])
    _exact(ts[1], [1.0, -0.25])
    _exact(ts[2], [1.0])


# --- in-place forms against torch.nn.utils --------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("scale, max_norm", [(1e-3, 1e-4), (1.0, 0.5), (100.0, 3.0)])
def test_clip_by_global_norm_in_place_against_torch_and_the_formula(norm_type, scale, max_norm):
    ours, theirs = _params(21, scale), _params(21, scale)
    original = _clones(_grads(ours))

    norm = clip_by_global_norm_(_grads(ours), max_norm, norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)

    # The returned pre-clip norm is torch's, bit for bit.
    assert norm.shape == () and norm.dtype == torch.float32
    _exact(norm, torch_norm)
    _exact(norm, torch.nn.utils.get_total_norm(original, norm_type))
    assert norm > max_norm  # these cases clip

    # Exactly the formula g * min(1, max_norm / norm), computed here on its own.
    coef = torch.minimum(torch.tensor(max_norm, dtype=torch.float32) / torch_norm, torch.tensor(1.0))
    for p, g in zip(ours, original):
        _exact(p.grad, g * coef)

    # torch's coefficient is max_norm / (norm + 1e-6): the only difference is that epsilon.
    rel = TORCH_EPS / torch_norm.item()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(b.grad, a.grad * (1.0 - rel), rtol=2e-6, atol=0.0)
        if rel > 1e-5:  # the epsilon is visible: we must not match torch without it
            assert not torch.allclose(a.grad, b.grad, rtol=rel / 10, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.05, 1.0, 4.0])
def test_clip_by_norm_in_place_per_tensor_against_torch_and_the_formula(norm_type, max_norm):
    ours = _params(22, 1.0)
    original = _clones(_grads(ours))

    norms = clip_by_norm_(_grads(ours), max_norm, norm_type)

    # Per-tensor pre-clip norms, in order.
    assert norms.shape == (len(ours),) and norms.dtype == torch.float32
    for n, g in zip(norms, original):
        torch.testing.assert_close(n, torch.linalg.vector_norm(g, norm_type), rtol=1.3e-6, atol=0.0)

    for p, g, n in zip(ours, original, norms):
        coef = torch.minimum(torch.tensor(max_norm, dtype=torch.float32) / n, torch.tensor(1.0))
        _exact(p.grad, g * coef)
        # Each tensor on its own equals torch's clip_grad_norm_ on that tensor alone, up to its epsilon.
        single = torch.nn.Parameter(torch.zeros_like(g))
        single.grad = g.clone()
        torch.nn.utils.clip_grad_norm_([single], max_norm, norm_type)
        torch.testing.assert_close(single.grad, p.grad, rtol=TORCH_EPS / max(n.item(), max_norm) + 2e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("clip_", [clip_by_norm_, clip_by_global_norm_], ids=["per-tensor", "global"])
def test_in_place_forms_leave_gradients_at_or_under_the_threshold_bit_for_bit(clip_, norm_type):
    params = _params(23, 0.1)
    grads = _grads(params)
    original = _clones(grads)
    if clip_ is clip_by_global_norm_:
        at_threshold = torch.nn.utils.get_total_norm(grads, norm_type).item()
    else:  # the largest tensor sits exactly at the threshold, as its norm is computed
        at_threshold = clip_by_norm_(grads, 1e30, norm_type).max().item()
    for max_norm in (at_threshold, at_threshold * 1.5, 1e6):
        clip_(grads, max_norm, norm_type)
        for g, o in zip(grads, original):
            _exact(g, o)
    # torch's epsilon changes the gradients in the same situation.
    torch.nn.utils.clip_grad_norm_(params, torch.nn.utils.get_total_norm(original, norm_type).item(), norm_type)
    assert any(not torch.equal(p.grad, o) for p, o in zip(params, original))


def test_in_place_forms_accept_a_single_tensor_and_skip_none():
    t = torch.tensor([3.0, 4.0])
    _exact(clip_by_global_norm_(t, 1.0), 5.0)
    _exact(t, [0.6, 0.8])
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 8.0])
    _exact(clip_by_norm_([None, a, None, b], 2.0), [5.0, 8.0])
    _exact(a, [1.2, 1.6])
    _exact(b, [0.0, 2.0])
    _exact(clip_by_global_norm_([None, None], 1.0), 0.0)
    assert clip_by_norm_([], 1.0).shape == (0,)


def _linear_with_gradients(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    (model(torch.randn(8, 4) * 10).pow(2).sum()).backward()
    return model


@pytest.mark.parametrize("op", ["global_norm", "norm", "value"])
def test_in_place_forms_given_parameters_clip_their_gradients_never_the_weights(op):
    # The torch habit: `clip_grad_norm_(model.parameters(), 0.1)`. Reference: the rule's formula in float64
    # on the gradients as they were.
    model = _linear_with_gradients()
    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.double() for p in model.parameters()]
    if op == "global_norm":
        norm = clip_by_global_norm_(model.parameters(), 0.1)
        total = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
        expected = [g * (0.1 / total) for g in grads]
        torch.testing.assert_close(norm.double(), total)
    elif op == "norm":
        clip_by_norm_(model.parameters(), 0.1)
        expected = [g * min(1.0, 0.1 / torch.linalg.vector_norm(g).item()) for g in grads]
    else:
        clip_by_value_(model.parameters(), 0.1)
        expected = [g.clamp(-0.1, 0.1) for g in grads]
    for p, w, e in zip(model.parameters(), weights, expected):
        assert torch.equal(p.detach(), w), "a weight changed"
        torch.testing.assert_close(p.grad.double(), e, rtol=1e-6, atol=1e-9)
    bound = [p.grad.abs().max() if op == "value" else torch.linalg.vector_norm(p.grad) for p in model.parameters()]
    assert max(bound).item() <= 0.1 * (1 + 1e-6)


def test_in_place_forms_skip_parameters_without_gradient():
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    used.grad = torch.tensor([3.0, 4.0])
    _exact(clip_by_global_norm_([used, unused], 1.0), 5.0)
    _exact(used.grad, [0.6, 0.8])
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(2))


def test_in_place_forms_take_gradients_that_require_grad_as_gradients():
    # gradients from backward(create_graph=True) require grad: they are not parameters
    x = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    (g,) = torch.autograd.grad((x**2).sum() / 2, [x], create_graph=True)
    assert g.requires_grad and not g.is_leaf
    clip_by_value_([g], 1.0)
    _exact(g.detach(), [1.0, 1.0])


def test_clip_by_value_in_place_with_nothing_to_clip_does_nothing():
    clip_by_value_([], 1.0)
    clip_by_value_(torch.nn.Linear(2, 2).parameters(), 1.0)  # no gradient yet


def test_in_place_forms_accept_a_tensor_threshold():
    t = torch.tensor([3.0, 4.0])
    clip_by_global_norm_([t], torch.tensor(1.0))
    _exact(t, [0.6, 0.8])
    t = torch.tensor([3.0, 4.0])
    clip_by_norm_([t], torch.tensor(2.5))
    _exact(t, [1.5, 2.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_by_global_norm_in_place_half_precision_matches_float32_math(dtype):
    ts = [(torch.randn(50, generator=torch.Generator().manual_seed(s)) * 30).to(dtype) for s in range(3)]
    original = _clones(ts)
    norm = clip_by_global_norm_(ts, 1.0)
    assert norm.dtype == torch.float32
    coef = torch.minimum(torch.tensor(1.0) / norm, torch.tensor(1.0))
    for t, o in zip(ts, original):
        # One rounding to the gradient dtype of the float32 product.
        _exact(t, (o.float() * coef).to(dtype))


def test_clip_by_global_norm_in_place_with_non_finite_norm_behaves_as_torch():
    # No epsilon and no special case: an inf norm gives coefficient 0, as torch's clip_grad_norm_.
    ours = [torch.tensor([1.0, math.inf]), torch.tensor([2.0])]
    theirs = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    for p, g in zip(theirs, ours):
        p.grad = g.clone()
    norm = clip_by_global_norm_(ours, 1.0)
    assert norm == math.inf
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for a, p in zip(ours, theirs):
        torch.testing.assert_close(a, p.grad, equal_nan=True, rtol=0, atol=0)


# --- clip_by_global_norm (TensorFlow form) --------------------------------------------------------


def test_clip_by_global_norm_matches_the_tensorflow_formula():
    ts = [t.grad for t in _params(24, 2.0)]
    clip_norm = 1.5
    out, norm = clip_by_global_norm(ts, clip_norm)
    # tf.linalg.global_norm: sqrt(sum of squares of all entries).
    reference_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in ts))
    torch.testing.assert_close(norm.double(), torch.tensor(reference_norm, dtype=torch.float64), rtol=1e-6, atol=0)
    assert norm > clip_norm
    scale = torch.tensor(clip_norm, dtype=torch.float32) / torch.maximum(norm, torch.tensor(clip_norm))
    for o, t in zip(out, ts):
        _exact(o, t * scale)
        torch.testing.assert_close(o.double(), t.double() * clip_norm / reference_norm, rtol=1e-6, atol=0.0)


def test_clip_by_global_norm_keeps_none_entries_in_place():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0])
    out, norm = clip_by_global_norm([None, a, None, b, None], 1.0)
    assert len(out) == 5
    assert out[0] is None and out[2] is None and out[4] is None
    _exact(out[1], [0.6, 0.8])
    _exact(out[3], [0.0])
    _exact(norm, 5.0)


@pytest.mark.parametrize("clip_norm", [0.1, 1e6])
def test_clip_by_global_norm_does_not_modify_its_inputs(clip_norm):
    ts = [t.grad for t in _params(25, 1.0)]
    before = _clones(ts)
    out, _ = clip_by_global_norm(ts, clip_norm)
    for t, b, o in zip(ts, before, out):
        _exact(t, b)
        assert o is not t and o.data_ptr() != t.data_ptr()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
def test_clip_by_global_norm_non_finite_norm_makes_every_entry_nan(bad):
    ts = [torch.tensor([1.0, bad]), torch.tensor([[2.0, 3.0]]), None, torch.zeros(3)]
    out, norm = clip_by_global_norm(ts, 1.0)
    assert not torch.isfinite(norm)
    assert out[2] is None
    for o, t in zip(out, ts):
        if t is not None:
            assert o.shape == t.shape
            assert torch.isnan(o).all(), o


def test_clip_by_global_norm_nan_use_norm_makes_every_entry_nan():
    out, norm = clip_by_global_norm([torch.tensor([3.0, 4.0])], 1.0, use_norm=torch.tensor(math.inf))
    assert norm == math.inf
    assert torch.isnan(out[0]).all()


def test_clip_by_global_norm_honours_use_norm():
    t = torch.tensor([3.0, 4.0])
    out, norm = clip_by_global_norm([t], 1.0, use_norm=torch.tensor(10.0))
    _exact(norm, 10.0)  # the given norm is returned, not recomputed (which would be 5)
    _exact(out[0], t * (torch.tensor(1.0) / torch.tensor(10.0)))
    # A use_norm under clip_norm leaves the tensors alone even though their own norm is larger.
    out, norm = clip_by_global_norm([t], 1.0, use_norm=torch.tensor(0.5))
    _exact(norm, 0.5)
    _exact(out[0], t)


def test_clip_by_global_norm_accepts_a_tensor_clip_norm():
    out, _ = clip_by_global_norm([torch.tensor([3.0, 4.0])], torch.tensor(2.5))
    _exact(out[0], [1.5, 2.0])


def test_clip_by_global_norm_with_an_empty_list():
    out, norm = clip_by_global_norm([], 1.0)
    assert out == []
    _exact(norm, 0.0)


def test_clip_by_global_norm_float16_with_a_tiny_coefficient_stays_under_the_threshold():
    # Coefficient 1e-3 / 2e4 = 5e-8 is a float16 subnormal: it must not be rounded to float16 before
    # multiplying (the in-place form and clip_by_norm compute it in float32 and round once).
    t = torch.full((400,), 1000.0, dtype=torch.float16)
    out, norm = clip_by_global_norm([t], 1e-3)
    _exact(norm, 20000.0)
    post = torch.linalg.vector_norm(out[0].double())
    assert post <= 1e-3 * (1 + 2 * torch.finfo(torch.float16).eps), post
    _exact(out[0], (t.float() * (torch.tensor(1e-3) / norm)).half())


# --- clip_by_norm (TensorFlow form) ---------------------------------------------------------------


@pytest.mark.parametrize("axes", [None, [0], [1], [0, 2], [2]])
def test_clip_by_norm_with_axes_matches_the_tensorflow_formula(axes):
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(26)) * 2
    x[1, 2, :] = 0.0  # a zero slice along the last axis
    clip_norm = 1.0
    out = clip_by_norm(x, clip_norm, axes=axes)
    dims = tuple(range(x.dim())) if axes is None else tuple(axes)
    l2 = x.double().pow(2).sum(dim=dims, keepdim=True).sqrt()
    expected = x.double() * clip_norm / torch.maximum(l2, torch.tensor(clip_norm, dtype=torch.float64))
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0.0)
    assert torch.isfinite(out).all()
    post = out.double().pow(2).sum(dim=dims).sqrt()
    assert (post <= clip_norm * (1 + 1e-6)).all()


def test_clip_by_norm_of_a_zero_tensor_and_a_scalar():
    _exact(clip_by_norm(torch.zeros(2, 3), 1.0), torch.zeros(2, 3))
    _exact(clip_by_norm(torch.tensor(-4.0), 2.0), -2.0)
    _exact(clip_by_norm(torch.tensor(0.0), 2.0), 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_by_norm_half_precision_does_not_overflow(dtype):
    x = torch.full((100,), 6e4).to(dtype)  # sum of squares overflows float16
    out = clip_by_norm(x, 1.0)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), x.double() / torch.linalg.vector_norm(x.double()),
                               rtol=2 * torch.finfo(dtype).eps, atol=0.0)


def test_clip_by_norm_does_not_modify_its_input():
    x = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    before = x.clone()
    out = clip_by_norm(x, 1.0, axes=[1])
    _exact(x, before)
    assert out.data_ptr() != x.data_ptr()


def test_functions_do_not_record_autograd_history():
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    assert clip_by_norm(w * 1, 1.0).grad_fn is None
    assert clip_by_value(w * 1, -1, 1).grad_fn is None
    out, norm = clip_by_global_norm([w * 1], 1.0)
    assert out[0].grad_fn is None and norm.grad_fn is None


# --- errors ---------------------------------------------------------------------------------------

BAD_THRESHOLDS = [0, 0.0, -1.0, math.nan, math.inf, -math.inf, True, "1.0", None]


@pytest.mark.parametrize("bad", BAD_THRESHOLDS, ids=repr)
@pytest.mark.parametrize(
    "name, call",
    [
        ("clip_norm", lambda v: clip_by_norm(torch.ones(2), v)),
        ("clip_norm", lambda v: clip_by_global_norm([torch.ones(2)], v)),
        ("max_norm", lambda v: clip_by_norm_([torch.ones(2)], v)),
        ("max_norm", lambda v: clip_by_global_norm_([torch.ones(2)], v)),
        ("max_norm", lambda v: clip_by_global_norm_([], v)),
        ("clip_value", lambda v: clip_by_value_([torch.ones(2)], v)),
    ],
    ids=["clip_by_norm", "clip_by_global_norm", "clip_by_norm_", "clip_by_global_norm_",
         "clip_by_global_norm_-empty", "clip_by_value_"],
)
def test_bad_thresholds_are_rejected_naming_the_argument_and_value(name, call, bad):
    with pytest.raises(ValueError, match=rf"^`{name}` must be a positive finite number, got {re.escape(repr(bad))}$"):
        call(bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, -math.inf], ids=repr)
@pytest.mark.parametrize("clip_", [clip_by_norm_, clip_by_global_norm_], ids=["clip_by_norm_", "clip_by_global_norm_"])
def test_bad_norm_type_is_rejected_by_the_in_place_forms(clip_, bad):
    t = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError, match=re.escape(f"`norm_type` must be a positive number or 'inf', got {bad!r}")):
        clip_([t], 1.0, norm_type=bad)
    _exact(t, [3.0, 4.0])  # nothing was clipped before the error


@pytest.mark.parametrize("lo, hi", [(1, -1), (0.5, 0.25), (2, 1.5)])
def test_clip_by_value_rejects_min_above_max(lo, hi):
    with pytest.raises(ValueError, match=rf"^`clip_value_min` must be <= `clip_value_max`, got {lo!r} > {hi!r}$"):
        clip_by_value(torch.ones(2), lo, hi)


def test_clip_by_value_accepts_equal_bounds():
    _exact(clip_by_value(torch.tensor([-3.0, 0.0, 3.0]), 0.5, 0.5), [0.5, 0.5, 0.5])


def test_clip_by_value_rejects_bounds_that_broadcast_the_tensor():
    with pytest.raises(ValueError, match=r"clipping bounds must not broadcast `t` of shape \(3,\) to \(2, 3\)"):
        clip_by_value(torch.ones(3), torch.zeros(2, 1), torch.ones(2, 1))


def test_clip_by_global_norm_rejects_a_single_tensor():
    with pytest.raises(TypeError, match="`t_list` must be a sequence of tensors, got a single tensor"):
        clip_by_global_norm(torch.ones(3), 1.0)


# --- properties (hypothesis) ----------------------------------------------------------------------

# Slack for "up to rounding": each entry is rounded once to its dtype after scaling (relative
# error <= eps/2), and the norms before and after are accumulated in float32.
RTOL = {torch.float32: 1e-5, torch.float16: 2 * torch.finfo(torch.float16).eps,
        torch.bfloat16: 2 * torch.finfo(torch.bfloat16).eps}


def _atol(dtype: torch.dtype) -> float:
    """The spacing of the dtype's subnormals: what underflow can take from a scaled entry."""
    info = torch.finfo(dtype)
    return info.tiny * info.eps


_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
_thresholds = st.floats(1e-3, 1e3)


@st.composite
def _tensor_lists(draw, dtype):
    out = []
    for shape in draw(st.lists(_shapes, min_size=1, max_size=4)):
        n = math.prod(shape)
        values = draw(st.lists(st.floats(-1e3, 1e3, width=16), min_size=n, max_size=n))
        out.append(torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype))
    return out


@st.composite
def _cases(draw):
    dtype = draw(_dtypes)
    return dtype, draw(_tensor_lists(dtype)), draw(st.sampled_from(NORM_TYPES)), draw(_thresholds)


def _norm64(t: torch.Tensor, norm_type: float) -> torch.Tensor:
    return torch.linalg.vector_norm(t.double().reshape(-1), norm_type)


def _assert_scaled_copy(after: torch.Tensor, before: torch.Tensor, rtol: float, atol: float) -> None:
    """``after == c * before`` for one c with 0 < c <= 1 (up to rounding): the direction is kept."""
    a, b = after.double().reshape(-1), before.double().reshape(-1)
    if not b.any():
        assert not a.any()
        return
    assert ((a == 0) | (torch.sign(a) == torch.sign(b))).all(), "an entry changed sign"
    assert (a.abs() <= b.abs() * (1 + rtol) + atol).all(), "an entry grew"
    c = (a @ b) / (b @ b)  # least-squares scale
    assert c <= 1 + rtol, c
    if (a.abs() > atol).any():  # unless the whole tensor underflowed to zero, the scale is positive
        assert c > 0, c
    torch.testing.assert_close(a, c * b, rtol=rtol, atol=atol)


def _clipped(case, which):
    dtype, tensors, norm_type, threshold = case
    work = _clones(tensors)
    if which == "global_":
        clip_by_global_norm_(work, threshold, norm_type)
    elif which == "per_tensor_":
        clip_by_norm_(work, threshold, norm_type)
    elif which == "tf_global":
        work, _ = clip_by_global_norm(work, threshold)
    else:
        work = [clip_by_norm(t, threshold) for t in work]
    return work


FORMS = ["global_", "per_tensor_", "tf_global", "tf_norm"]


def _norm_type_of(which, norm_type):
    return norm_type if which in ("global_", "per_tensor_") else 2.0  # TensorFlow's forms are L2 only


@settings(max_examples=50, deadline=None)
@given(case=_cases(), which=st.sampled_from(FORMS))
def test_property_post_clip_norm_never_above_threshold(case, which):
    dtype, tensors, norm_type, threshold = case
    p = _norm_type_of(which, norm_type)
    after = _clipped(case, which)

    def bound(n):  # relative rounding, plus the p-norm of n entries each off by <= one subnormal step
        return threshold * (1 + RTOL[dtype]) + n ** (1 / p) * _atol(dtype)

    if which in ("global_", "tf_global"):
        post = torch.linalg.vector_norm(torch.stack([_norm64(t, p) for t in after]), p)
        assert post <= bound(sum(t.numel() for t in after)), (post, threshold)
    else:
        for t in after:
            assert _norm64(t, p) <= bound(t.numel()), (_norm64(t, p), threshold)


@settings(max_examples=50, deadline=None)
@given(case=_cases(), which=st.sampled_from(FORMS))
def test_property_direction_is_kept(case, which):
    dtype, tensors, norm_type, threshold = case
    after = _clipped(case, which)
    for a, b in zip(after, tensors):
        assert a.shape == b.shape and a.dtype == b.dtype
        _assert_scaled_copy(a, b, RTOL[dtype], _atol(dtype))
    if which in ("global_", "tf_global"):
        # One coefficient for all tensors: the concatenation is a scaled copy too.
        _assert_scaled_copy(torch.cat([a.reshape(-1) for a in after]),
                            torch.cat([b.reshape(-1) for b in tensors]), RTOL[dtype], _atol(dtype))


@settings(max_examples=50, deadline=None)
@given(case=_cases(), which=st.sampled_from(FORMS))
def test_property_clipping_twice_changes_nothing(case, which):
    dtype, tensors, norm_type, threshold = case
    once = _clipped(case, which)
    twice = _clipped((dtype, once, norm_type, threshold), which)
    for a, b in zip(twice, once):
        torch.testing.assert_close(a, b, rtol=RTOL[dtype], atol=_atol(dtype))


@settings(max_examples=50, deadline=None)
@given(case=_cases(), which=st.sampled_from(FORMS))
def test_property_under_the_threshold_nothing_changes(case, which):
    dtype, tensors, norm_type, _ = case
    p = _norm_type_of(which, norm_type)
    norms = [float(torch.linalg.vector_norm(t.float(), p)) for t in tensors]
    threshold = (float(torch.linalg.vector_norm(torch.tensor(norms), p)) if which in ("global_", "tf_global")
                 else max(norms)) * 2 + 1e-3
    after = _clipped((dtype, tensors, norm_type, threshold), which)
    for a, b in zip(after, tensors):
        if which == "tf_norm":  # TensorFlow's t * clip / clip may round once (an ulp of float32)
            torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps, atol=0.0)
        else:  # coefficient exactly 1.0: bit for bit
            _exact(a, b)


@settings(max_examples=50, deadline=None)
@given(case=_cases(), lo=st.floats(-1e3, 0), width=st.floats(0, 1e3))
def test_property_out_of_place_forms_leave_inputs_alone(case, lo, width):
    dtype, tensors, _, threshold = case
    before = _clones(tensors)
    clip_by_global_norm(tensors, threshold)
    for t in tensors:
        clip_by_norm(t, threshold)
        clip_by_value(t, lo, lo + width)
    for t, b in zip(tensors, before):
        _exact(t, b)


@settings(max_examples=50, deadline=None)
@given(dtype=_dtypes, tensors=st.data(), value=_thresholds)
def test_property_clip_by_value_in_place_matches_torch(dtype, tensors, value):
    ts = tensors.draw(_tensor_lists(dtype))
    params = []
    for t in ts:
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t.clone()
        params.append(p)
    clip_by_value_(ts, value)
    torch.nn.utils.clip_grad_value_(params, value)
    for t, p in zip(ts, params):
        _exact(t, p.grad)
        assert (t.abs() <= value).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_by_a_float_applies_it_in_float32(dtype):
    # A tiny coefficient rounded to float16 first would overshoot the threshold by 19%: a Python float
    # coefficient (what the adaptive callbacks pass when the norm was read on the host) is applied as a
    # float32 one, like a float32 tensor coefficient.
    g = torch.full((4,), 50000.0).to(dtype)
    norm = torch.linalg.vector_norm(g.float()).item()
    by_float, by_tensor = g.clone(), g.clone()
    scale_([by_float], 0.015 / norm)
    scale_([by_tensor], torch.tensor(0.015 / norm))
    assert torch.equal(by_float, by_tensor)
    assert torch.linalg.vector_norm(by_float.float()).item() == pytest.approx(0.015, rel=2 * torch.finfo(dtype).eps)


# --- what the in-place forms take: frozen parameters (issue 17) -----------------------------------


def _model_with_a_frozen_layer(stale_grad: bool) -> torch.nn.Module:
    """Two linear layers, the first frozen: without a gradient, or keeping one from before it was frozen."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(8, 4) * 10
    if stale_grad:
        model(x).pow(2).sum().backward()
    model[0].requires_grad_(False)
    model(x).pow(2).sum().backward()
    return model


FROZEN_CASES = [("global_norm", p) for p in NORM_TYPES] + [("norm", p) for p in NORM_TYPES] + [("value", None)]


@pytest.mark.parametrize("stale_grad", [False, True], ids=["no-grad", "stale-grad"])
@pytest.mark.parametrize("op, norm_type", FROZEN_CASES)
def test_in_place_forms_over_a_model_with_a_frozen_layer_match_torch(op, norm_type, stale_grad):
    # A frozen nn.Parameter stands for its .grad like any parameter (torch's rule): its weights are never
    # clamped or scaled, nor counted in the norm.
    ours, theirs = _model_with_a_frozen_layer(stale_grad), _model_with_a_frozen_layer(stale_grad)
    weights = _clones(ours.parameters())
    grads = [None if p.grad is None else p.grad.clone() for p in ours.parameters()]
    assert any(not p.requires_grad for p in ours.parameters())
    if op == "global_norm":
        norm = clip_by_global_norm_(ours.parameters(), 0.1, norm_type)
        _exact(norm, torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.1, norm_type))
        coefs = [torch.clamp(torch.tensor(0.1) / norm, max=1.0)] * len(grads)
    elif op == "norm":
        norms = iter(clip_by_norm_(ours.parameters(), 0.1, norm_type))
        coefs = []
        for p, g in zip(theirs.parameters(), grads):
            n = None if g is None else next(norms)
            if g is not None:  # torch's clip_grad_norm_ on that parameter alone
                torch_norm = torch.nn.utils.clip_grad_norm_([p], 0.1, norm_type)
                torch.testing.assert_close(n, torch_norm, rtol=1.3e-6, atol=0.0)
            coefs.append(None if n is None else torch.clamp(torch.tensor(0.1) / n, max=1.0))
    else:
        clip_by_value_(ours.parameters(), 0.1)
        torch.nn.utils.clip_grad_value_(theirs.parameters(), 0.1)
        coefs = [None] * len(grads)
    for p, q, w, g, c in zip(ours.parameters(), theirs.parameters(), weights, grads, coefs):
        _exact(p.detach(), w)  # a weight never changes
        if g is None:
            assert p.grad is None
        elif op == "value":
            _exact(p.grad, q.grad)
        else:
            _exact(p.grad, g * c)
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0.0)  # torch's differs by its epsilon


def test_in_place_forms_over_frozen_parameters_alone_clip_nothing():
    model = torch.nn.Linear(3, 2).requires_grad_(False)
    weights = _clones(model.parameters())
    _exact(clip_by_global_norm_(model.parameters(), 1e-3), 0.0)
    assert clip_by_norm_(model.parameters(), 1e-3).shape == (0,)
    clip_by_value_(model.parameters(), 1e-3)
    for p, w in zip(model.parameters(), weights):
        _exact(p.detach(), w)


# --- the out-of-place forms take gradients, not parameters (issue 17) -----------------------------


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
@pytest.mark.parametrize(
    "name, call",
    [
        ("clip_by_value", lambda ts: clip_by_value(ts[0], -0.1, 0.1)),
        ("clip_by_norm", lambda ts: clip_by_norm(ts[0], 0.1)),
        ("clip_by_global_norm", lambda ts: clip_by_global_norm(ts, 0.1)),
        ("clip_by_global_norm", lambda ts: clip_by_global_norm(iter([ts[0].grad, ts[1]]), 0.1)),
    ],
    ids=["clip_by_value", "clip_by_norm", "clip_by_global_norm", "clip_by_global_norm-mixed"],
)
def test_out_of_place_forms_refuse_parameters_naming_the_in_place_form(name, call, frozen):
    model = _linear_with_gradients().requires_grad_(not frozen)
    params = list(model.parameters())
    pattern = rf"^{name} takes gradients, got an nn\.Parameter of shape \([\d, ]+\): to clip parameters' "
    with pytest.raises(TypeError, match=pattern + rf"gradients in place use {name}_\(model\.parameters\(\), \.\.\.\)$"):
        call(params)


def test_out_of_place_forms_take_plain_tensors_that_require_grad():
    # TensorFlow-style tensors: variables and gradients made with create_graph=True require grad.
    leaf = torch.tensor([3.0, 4.0], requires_grad=True)
    (grad,) = torch.autograd.grad((leaf**2).sum() / 2, [leaf], create_graph=True)
    for t in (leaf, grad):
        _exact(clip_by_value(t, -1, 1), [1.0, 1.0])
        _exact(clip_by_norm(t, 1.0), [0.6, 0.8])
    out, norm = clip_by_global_norm([leaf, grad], 5.0 * math.sqrt(2) * 2)
    _exact(norm, torch.linalg.vector_norm(torch.tensor([3.0, 4.0, 3.0, 4.0])))
    _exact(leaf.detach(), [3.0, 4.0])


# --- complex gradients (issue 17) -----------------------------------------------------------------


def _complex_params(seed: int, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """Complex parameters with complex gradients of assorted shapes (real and imaginary parts independent)."""
    params = []
    for re_, im in zip(_params(seed, 1.0), _params(seed + 100, 1.0)):
        p = torch.nn.Parameter(torch.zeros(re_.shape, dtype=dtype))
        p.grad = torch.complex(re_.grad, im.grad).to(dtype)
        params.append(p)
    return params


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_clip_by_global_norm_in_place_of_complex_gradients_against_torch(dtype, norm_type):
    ours, theirs = _complex_params(26, dtype), _complex_params(26, dtype)
    original = _clones(_grads(ours))
    norm = clip_by_global_norm_(ours, 0.5, norm_type)
    _exact(norm, torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type))
    assert norm.dtype == torch.tensor(0, dtype=dtype).real.dtype and norm > 0.5
    coef = torch.clamp(torch.full_like(norm, 0.5) / norm, max=1.0)
    for p, q, g in zip(ours, theirs, original):
        _exact(torch.view_as_real(p.grad), torch.view_as_real(g) * coef)  # both parts scaled by the real coefficient
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0.0)
    # post-clip norm of the moduli at the threshold
    after = torch.cat([p.grad.to(torch.complex128).abs().reshape(-1) for p in ours])
    assert torch.linalg.vector_norm(after, norm_type) == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_clip_by_norm_in_place_of_complex_gradients_per_tensor(norm_type):
    grads = _grads(_complex_params(27, torch.complex64))
    original = _clones(grads)
    norms = clip_by_norm_(grads, 0.5, norm_type)
    assert norms.dtype == torch.float32
    for g, o, n in zip(grads, original, norms):
        torch.testing.assert_close(n, torch.linalg.vector_norm(o, norm_type), rtol=1.3e-6, atol=0.0)
        _exact(torch.view_as_real(g), torch.view_as_real(o) * torch.clamp(torch.tensor(0.5) / n, max=1.0))


def test_scale_multiplies_real_and_imaginary_parts_by_a_real_coefficient():
    z = torch.tensor([3 - 4j, complex(1.5, math.inf)], dtype=torch.complex64)
    w = torch.tensor([1 + 2j], dtype=torch.complex128)
    r = torch.tensor([2.0])
    scale_([z, w, r], 0.5)  # (1.5 + inf j) * (0.5 + 0j) would be NaN: a real coefficient keeps the parts apart
    _exact(torch.view_as_real(z), [[1.5, -2.0], [0.75, math.inf]])
    _exact(torch.view_as_real(w), [[0.5, 1.0]])
    _exact(r, [1.0])
    scale_([z, w, r], torch.tensor([2.0, 4.0, 0.25]))  # one coefficient per tensor
    _exact(torch.view_as_real(z), [[3.0, -4.0], [1.5, math.inf]])
    _exact(torch.view_as_real(w), [[2.0, 4.0]])
    _exact(r, [0.25])


def test_out_of_place_norm_forms_keep_the_imaginary_part():
    z = torch.tensor([3 + 4j, 0j], dtype=torch.complex64)
    _exact(torch.view_as_real(clip_by_norm(z, 1.0)), [[0.6, 0.8], [0.0, 0.0]])
    out, norm = clip_by_global_norm([z, None], 1.0)
    _exact(norm, 5.0)
    _exact(torch.view_as_real(out[0]), [[0.6, 0.8], [0.0, 0.0]])


def test_clip_by_value_in_place_refuses_complex_gradients_as_torch_does():
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.complex64))
    p.grad = torch.tensor([3 + 4j])
    with pytest.raises(NotImplementedError, match="clamp is not supported for complex types"):
        torch.nn.utils.clip_grad_value_([p], 1.0)
    r = torch.tensor([3.0, -3.0])
    pattern = r"^clip_by_value_ does not support complex parameters, got torch\.complex64 in `tensors`\. .*clip_by_norm_"
    with pytest.raises(ValueError, match=pattern):
        clip_by_value_([r, p], 1.0)
    _exact(r, [3.0, -3.0])  # nothing was clamped before the error
