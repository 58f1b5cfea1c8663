"""Tests for ``gradclip_plugin.functional.gradients``: TensorFlow's compute/apply pipeline on torch."""

from __future__ import annotations

import pytest
import torch

from gradclip_plugin.functional import apply_gradients, clip_by_global_norm, compute_gradients


def _seed_example():
    """The seed's worked example: y = x1 * w + b, differentiated as sum(y)."""
    x1 = torch.tensor([2.0, 3.0])
    w = torch.tensor([[3.0, 4.0], [1.0, 2.0], [2.5, 4.1]], requires_grad=True)
    b = torch.tensor(1.0, requires_grad=True)
    return x1, w, b, x1 * w + b


# --- compute_gradients ----------------------------------------------------------------------------


def test_compute_gradients_seed_worked_example():
    x1, w, b, y = _seed_example()
    pairs = compute_gradients(y, [w, b])
    assert len(pairs) == 2
    (gw, vw), (gb, vb) = pairs
    assert vw is w and vb is b
    # d sum(x1 * w + b) / dw = x1 on every row; / db = number of entries of y.
    torch.testing.assert_close(gw, torch.tensor([[2.0, 3.0], [2.0, 3.0], [2.0, 3.0]]), rtol=0, atol=0)
    torch.testing.assert_close(gb, torch.tensor(6.0), rtol=0, atol=0)
    # .grad is not touched (TensorFlow's compute_gradients has no side effect).
    assert w.grad is None and b.grad is None


def test_compute_gradients_of_a_non_scalar_loss_equals_backward_of_its_sum():
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(4, 3, generator=g, requires_grad=True)
    w2 = torch.randn(3, generator=g, requires_grad=True)
    x = torch.randn(5, 4, generator=g)
    loss = torch.tanh(x @ w1) * w2  # shape (5, 3)
    pairs = compute_gradients(loss, [w2, w1])

    (torch.tanh(x @ w1) * w2).backward(torch.ones(5, 3))
    assert [v for _, v in pairs] == [w2, w1]
    torch.testing.assert_close(pairs[0][0], w2.grad, rtol=0, atol=0)
    torch.testing.assert_close(pairs[1][0], w1.grad, rtol=0, atol=0)


def test_compute_gradients_of_a_scalar_loss_is_plain_autograd():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    (gw, _), = compute_gradients((w ** 2).sum(), [w])
    torch.testing.assert_close(gw, 2 * w.detach(), rtol=0, atol=0)


def test_compute_gradients_gives_none_for_an_unused_variable():
    _, w, b, y = _seed_example()
    unused = torch.zeros(2, requires_grad=True)
    pairs = compute_gradients(y, [unused, w, b])
    assert pairs[0][0] is None and pairs[0][1] is unused
    torch.testing.assert_close(pairs[1][0], torch.tensor([[2.0, 3.0]] * 3), rtol=0, atol=0)


def test_compute_gradients_rejects_an_empty_var_list():
    _, _, _, y = _seed_example()
    with pytest.raises(ValueError, match=r"^`var_list` must name at least one tensor, got an empty list$"):
        compute_gradients(y, [])


# --- apply_gradients ------------------------------------------------------------------------------


def test_apply_gradients_sets_grad_and_steps_like_manual_sgd():
    _, w, b, y = _seed_example()
    w0, b0 = w.detach().clone(), b.detach().clone()
    lr = 0.1
    optimizer = torch.optim.SGD([w, b], lr=lr)
    pairs = compute_gradients(y, [w, b])

    assert apply_gradients(optimizer, pairs) is None

    assert w.grad is pairs[0][0] and b.grad is pairs[1][0]
    torch.testing.assert_close(w.detach(), w0 - lr * torch.tensor([[2.0, 3.0]] * 3), rtol=0, atol=1e-7)
    torch.testing.assert_close(b.detach(), b0 - lr * 6.0, rtol=0, atol=1e-7)


def test_apply_gradients_equals_backward_and_step_with_a_stateful_optimizer():
    def make():
        torch.manual_seed(1)
        return torch.nn.Linear(3, 2)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2))
    ours, theirs = make(), make()
    opt_ours = torch.optim.Adam(ours.parameters(), lr=0.05)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=0.05)
    for _ in range(3):
        apply_gradients(opt_ours, compute_gradients(ours(x).pow(2).mean(), list(ours.parameters())))
        opt_theirs.zero_grad()
        theirs(x).pow(2).mean().backward()
        opt_theirs.step()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_apply_gradients_skips_a_variable_whose_gradient_is_none():
    _, w, b, y = _seed_example()
    unused = torch.ones(2, requires_grad=True)
    optimizer = torch.optim.SGD([w, b, unused], lr=0.1)
    apply_gradients(optimizer, compute_gradients(y, [w, b, unused]))
    assert unused.grad is None
    torch.testing.assert_close(unused.detach(), torch.ones(2), rtol=0, atol=0)


def test_apply_gradients_rejects_a_variable_the_optimizer_does_not_hold():
    _, w, b, y = _seed_example()
    w0, b0 = w.detach().clone(), b.detach().clone()
    optimizer = torch.optim.SGD([w], lr=0.1)
    pairs = compute_gradients(y, [w, b])
    with pytest.raises(ValueError, match=r"`grads_and_vars\[1\]` holds a variable of shape \(\) that is not among "
                                         r"the optimizer's parameters; pass it to the optimizer"):
        apply_gradients(optimizer, pairs)
    # Checked before anything is changed: no .grad set, no step taken.
    assert w.grad is None and b.grad is None
    torch.testing.assert_close(w.detach(), w0, rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), b0, rtol=0, atol=0)


def test_apply_gradients_accepts_a_generator_of_pairs():
    _, w, b, y = _seed_example()
    w0 = w.detach().clone()
    optimizer = torch.optim.SGD([w, b], lr=1.0)
    apply_gradients(optimizer, ((g, v) for g, v in compute_gradients(y, [w, b])))
    torch.testing.assert_close(w.detach(), w0 - torch.tensor([[2.0, 3.0]] * 3), rtol=0, atol=1e-6)


# --- the whole TensorFlow pipeline ----------------------------------------------------------------


def test_compute_clip_apply_pipeline():
    # grads of the seed example: w -> rows of [2, 3] (norm sqrt(39)), b -> 6; global norm sqrt(39 + 36) = sqrt(75).
    _, w, b, y = _seed_example()
    w0, b0 = w.detach().clone(), b.detach().clone()
    optimizer = torch.optim.SGD([w, b], lr=1.0)
    pairs = compute_gradients(y, [w, b])
    clipped, norm = clip_by_global_norm([g for g, _ in pairs], 1.0)
    torch.testing.assert_close(norm, torch.tensor(75.0).sqrt(), rtol=1e-6, atol=0)
    apply_gradients(optimizer, zip(clipped, [v for _, v in pairs]))
    scale = 1.0 / 75.0 ** 0.5
    torch.testing.assert_close(w.detach(), w0 - scale * torch.tensor([[2.0, 3.0]] * 3), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.detach(), b0 - scale * 6.0, rtol=1e-6, atol=1e-6)


def test_apply_gradients_leaves_unlisted_parameters_alone_even_with_a_stale_grad():
    a = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    b = torch.nn.Parameter(torch.tensor([3.0]))
    stale = torch.tensor([100.0])
    b.grad = stale.clone()
    opt = torch.optim.SGD([a, b], lr=0.5)
    apply_gradients(opt, [(torch.tensor([2.0, 4.0]), a)])
    assert torch.equal(a.detach(), torch.tensor([0.0, 0.0]))
    assert torch.equal(b.detach(), torch.tensor([3.0]))  # TF applies only the listed pairs
    assert torch.equal(b.grad, stale)  # and the stale gradient is put back
