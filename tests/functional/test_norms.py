"""Tests for ``gradclip_plugin.functional.norms`` against torch's own norms and float64 references."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip_plugin.functional import combine_norms, global_norm, subset_norms, tensor_norms

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _tensors(seed: int, dtype: torch.dtype = torch.float32, scale: float = 3.0) -> list[torch.Tensor]:
    """A few tensors of assorted shapes (a scalar, a vector, a matrix, a 3-D block)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(), (7,), (5, 4), (2, 3, 6)]
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def _reference_norm(tensors: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of all tensors flattened into one float64 vector: the definition, not the implementation."""
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    return torch.linalg.vector_norm(flat, norm_type)


# --- global_norm ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_norm_equals_torch_get_total_norm_for_float32(norm_type, seed):
    tensors = _tensors(seed)
    ours = global_norm(tensors, norm_type)
    theirs = torch.nn.utils.get_total_norm(tensors, norm_type)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, theirs), (ours, theirs)
    torch.testing.assert_close(ours.double(), _reference_norm(tensors, norm_type), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_global_norm_skips_none_entries(norm_type):
    tensors = _tensors(3)
    with_none = [None, tensors[0], None, tensors[1], tensors[2], None, tensors[3]]
    assert torch.equal(global_norm(with_none, norm_type), torch.nn.utils.get_total_norm(tensors, norm_type))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("tensors", [[], [None], [None, None]], ids=["empty", "one-none", "all-none"])
def test_global_norm_of_nothing_is_a_float32_zero(tensors, norm_type):
    norm = global_norm(tensors, norm_type)
    assert norm.shape == ()
    assert norm.dtype == torch.float32
    assert torch.equal(norm, torch.tensor(0.0))


def test_global_norm_accepts_a_single_tensor():
    t = _tensors(4)[2]
    assert torch.equal(global_norm(t), torch.nn.utils.get_total_norm(t))


def test_global_norm_accepts_a_generator():
    tensors = _tensors(5)
    assert torch.equal(global_norm(t for t in tensors), torch.nn.utils.get_total_norm(tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_global_norm_is_a_0dim_float32_tensor(dtype, norm_type):
    norm = global_norm(_tensors(6, dtype), norm_type)
    assert norm.shape == ()
    assert norm.dtype == torch.float32


def test_global_norm_of_float64_stays_float64():
    tensors = _tensors(7, torch.float64)
    norm = global_norm(tensors)
    assert norm.dtype == torch.float64
    torch.testing.assert_close(norm, _reference_norm(tensors, 2.0), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_global_norm_of_large_float16_gradients_is_finite_and_correct(norm_type):
    # 6e4 is near float16's largest finite value (65504); the squares and the sum overflow float16.
    tensors = [torch.full((100,), 6e4, dtype=torch.float16), torch.full((3, 4), -6e4, dtype=torch.float16)]
    reference = _reference_norm(tensors, norm_type)
    if norm_type != math.inf:
        # The test means something: the exact norm is past float16's range, so a float16 result is inf.
        assert reference > torch.finfo(torch.float16).max
    norm = global_norm(tensors, norm_type)
    assert norm.dtype == torch.float32
    assert torch.isfinite(norm)
    torch.testing.assert_close(norm.double(), reference, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_global_norm_of_half_precision_matches_float64_reference(dtype, norm_type):
    tensors = _tensors(8, dtype, scale=50.0)
    torch.testing.assert_close(global_norm(tensors, norm_type).double(), _reference_norm(tensors, norm_type),
                               rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_global_norm_over_mixed_dtypes_matches_float64_reference(norm_type):
    a, b, c, d = _tensors(9, torch.float32)
    tensors = [a, b.half(), c.bfloat16(), d]
    norm = global_norm(tensors, norm_type)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), _reference_norm(tensors, norm_type), rtol=1e-6, atol=0.0)


def test_global_norm_propagates_non_finite_values():
    finite = torch.ones(3)
    assert global_norm([finite, torch.tensor([1.0, math.inf])]) == math.inf
    assert torch.isnan(global_norm([finite, torch.tensor([math.nan])]))


def test_global_norm_does_not_record_autograd_history():
    w = torch.randn(4, requires_grad=True)
    norm = global_norm([w * 2])
    assert not norm.requires_grad
    assert norm.grad_fn is None


# --- tensor_norms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_tensor_norms_match_vector_norm_per_tensor(norm_type):
    tensors = _tensors(10)
    norms = tensor_norms(tensors, norm_type)
    assert norms.shape == (len(tensors),)
    assert norms.dtype == torch.float32
    expected = torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors])
    torch.testing.assert_close(norms, expected, rtol=1.3e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_tensor_norms_keep_input_order_across_dtype_groups(norm_type):
    # Interleaved dtypes fall into separate (device, dtype) groups; the output must still be in input order.
    base = _tensors(11, torch.float32, scale=20.0) + _tensors(12, torch.float32, scale=0.5)
    dtypes = [torch.float16, torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float16,
              torch.float32, torch.float16]
    tensors = [t.to(d) for t, d in zip(base, dtypes)]
    norms = tensor_norms(tensors, norm_type)
    assert norms.dtype == torch.float32
    expected = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in tensors])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0.0)


def test_tensor_norms_skip_none_and_empty_gives_empty():
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([-2.0])
    torch.testing.assert_close(tensor_norms([None, a, None, b]), torch.tensor([5.0, 2.0]), rtol=0, atol=0)
    empty = tensor_norms([])
    assert empty.shape == (0,)
    assert empty.dtype == torch.float32
    assert tensor_norms([None]).shape == (0,)


def test_tensor_norms_of_large_float16_are_finite():
    t = torch.full((50,), 6e4, dtype=torch.float16)
    norms = tensor_norms([t, -t])
    expected = torch.linalg.vector_norm(t.double()).repeat(2)
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_tensor_norms_are_accumulated_in_float32(dtype, norm_type):
    # A result rounded to the tensor's dtype is off by up to 2^-9 (bfloat16) or 2^-12 (float16); a float32
    # sum of 2^18 terms by far less: the norms are float32 tensors, within 1e-4 of the float64 reference.
    g = torch.Generator().manual_seed(3)
    tensors = [(torch.randn(n, generator=g) * 3).to(dtype) for n in (1 << 18, 1000, 7)]
    norms = tensor_norms(tensors, norm_type)
    assert norms.dtype == torch.float32
    expected = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in tensors])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-4, atol=0.0)
    assert torch.finfo(dtype).eps / 2 > 1e-4  # the dtype's own rounding would fail this tolerance


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_combine_norms_of_tensor_norms_is_the_global_norm(norm_type):
    tensors = _tensors(13)
    combined = combine_norms(tensor_norms(tensors, norm_type), norm_type)
    torch.testing.assert_close(combined.double(), _reference_norm(tensors, norm_type), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(
    "norm_type, expected",
    [(1.0, 3.0 + 4.0 + 12.0), (2.0, 13.0), (3.0, (27.0 + 64.0 + 1728.0) ** (1 / 3)), (math.inf, 12.0)],
)
def test_combine_norms_hand_worked(norm_type, expected):
    torch.testing.assert_close(combine_norms(torch.tensor([3.0, 4.0, 12.0]), norm_type),
                               torch.tensor(expected), rtol=1e-6, atol=0.0)


def test_combine_norms_of_nothing_is_zero():
    out = combine_norms(torch.zeros(0))
    assert out.shape == ()
    assert torch.equal(out, torch.tensor(0.0))


# --- subset_norms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_subset_norms_match_vector_norm_per_group(norm_type):
    tensors = _tensors(14) + _tensors(15, scale=0.1)
    segments = [2, 0, 2, 1, 0, 0, 3, 2]  # segment 4 has no tensor
    members = torch.tensor([[seg == s for seg in segments] for s in range(5)])
    out = subset_norms(tensor_norms(tensors, norm_type), members, norm_type)
    assert out.shape == (5,)
    expected = []
    for s in range(5):
        group = [t for t, seg in zip(tensors, segments) if seg == s]
        expected.append(_reference_norm(group, norm_type) if group else torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close(out.double(), torch.stack(expected), rtol=1e-6, atol=0.0)
    assert out[4] == 0


def test_subset_norms_hand_worked_with_overlapping_and_empty_subsets():
    norms = torch.tensor([3.0, 4.0, 12.0])
    members = torch.tensor([[True, True, True], [True, True, False], [False, False, True], [False, False, False]])
    torch.testing.assert_close(subset_norms(norms, members, 2.0), torch.tensor([13.0, 5.0, 12.0, 0.0]), rtol=1e-6, atol=0)
    torch.testing.assert_close(subset_norms(norms, members, 1.0), torch.tensor([19.0, 7.0, 12.0, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(subset_norms(norms, members, math.inf), torch.tensor([12.0, 4.0, 12.0, 0.0]), rtol=0, atol=0)
    expected3 = torch.tensor([(27.0 + 64.0 + 1728.0) ** (1 / 3), (27.0 + 64.0) ** (1 / 3), 12.0, 0.0])
    torch.testing.assert_close(subset_norms(norms, members, 3.0), expected3, rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_subset_norms_keep_a_non_finite_norm_in_its_own_subsets(norm_type):
    members = torch.tensor([[True, False, False], [False, True, True], [True, True, True]])
    for bad in (math.inf, math.nan):
        out = subset_norms(torch.tensor([bad, 4.0, 12.0]), members, norm_type)
        assert torch.isfinite(out[1]), out  # a masked-out inf times 0 would have made this NaN
        assert not torch.isfinite(out[0]) and not torch.isfinite(out[2])


# --- errors ---------------------------------------------------------------------------------------

BAD_NORM_TYPES = [0.0, -1.0, -math.inf, math.nan, "abc", None, True]


@pytest.mark.parametrize("bad", BAD_NORM_TYPES)
@pytest.mark.parametrize(
    "call",
    [
        lambda p: global_norm([torch.ones(2)], p),
        lambda p: global_norm([], p),
        lambda p: tensor_norms([torch.ones(2)], p),
        lambda p: tensor_norms([], p),
        lambda p: combine_norms(torch.ones(2), p),
        lambda p: subset_norms(torch.ones(2), torch.tensor([[True, False]]), p),
    ],
    ids=["global_norm", "global_norm-empty", "tensor_norms", "tensor_norms-empty", "combine_norms", "subset_norms"],
)
def test_bad_norm_type_is_rejected_with_its_value(call, bad):
    with pytest.raises(ValueError, match=re.escape(f"`norm_type` must be a positive number or 'inf', got {bad!r}")):
        call(bad)


# --- properties -----------------------------------------------------------------------------------

_shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def _tensor_lists(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    out = []
    for shape in draw(st.lists(_shapes, min_size=1, max_size=4)):
        n = math.prod(shape)
        values = draw(st.lists(st.floats(-6e4, 6e4, width=16), min_size=n, max_size=n))
        out.append(torch.tensor(values, dtype=torch.float32).reshape(shape).to(dtype))
    return out


@settings(max_examples=50, deadline=None)
@given(tensors=_tensor_lists(), norm_type=st.sampled_from(NORM_TYPES))
def test_property_global_norm_matches_float64_reference(tensors, norm_type):
    norm = global_norm(tensors, norm_type)
    assert norm.dtype == torch.float32 and norm.shape == ()
    assert torch.isfinite(norm)
    torch.testing.assert_close(norm.double(), _reference_norm(tensors, norm_type), rtol=1e-5, atol=1e-30)
    per_tensor = tensor_norms(tensors, norm_type)
    expected = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in tensors])
    torch.testing.assert_close(per_tensor.double(), expected, rtol=1e-5, atol=1e-30)


# --- complex tensors ------------------------------------------------------------------------------


def _complex_tensors(seed: int, dtype: torch.dtype = torch.complex64) -> list[torch.Tensor]:
    """Complex tensors of the shapes of :func:`_tensors`, with independent real and imaginary parts."""
    return [torch.complex(a, b).to(dtype) for a, b in zip(_tensors(seed), _tensors(seed + 100))]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype, real", [(torch.complex64, torch.float32), (torch.complex128, torch.float64)])
def test_complex_tensors_are_measured_by_their_moduli_as_torch(dtype, real, norm_type):
    # torch.linalg.vector_norm and get_total_norm take a complex tensor's norm as that of |z|, in the real dtype
    # of its precision: ours are torch's, bit for bit, and the definition in float64.
    tensors = _complex_tensors(14, dtype)
    norms = tensor_norms(tensors, norm_type)
    assert norms.dtype == real
    torch.testing.assert_close(norms, torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors]),
                               rtol=1.3e-6, atol=0.0)
    total = global_norm(tensors, norm_type)
    assert total.dtype == real
    assert torch.equal(total, torch.nn.utils.get_total_norm(tensors, norm_type)), total
    moduli = torch.cat([t.to(torch.complex128).abs().reshape(-1) for t in tensors])
    torch.testing.assert_close(total.double(), torch.linalg.vector_norm(moduli, norm_type), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_tensor_norms_of_complex_and_real_tensors_together_keep_their_order(norm_type):
    real, cplx = _tensors(15), _complex_tensors(16)
    tensors = [real[0], cplx[1], real[2], cplx[3], real[1].half()]
    norms = tensor_norms(tensors, norm_type)
    assert norms.dtype == torch.float32
    expected = torch.stack([torch.linalg.vector_norm(t.to(torch.complex128), norm_type) for t in tensors])
    torch.testing.assert_close(norms.double(), expected, rtol=1e-6, atol=0.0)
