"""The shared read-only constants of a training step (taskbalance._constants)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import taskbalance as tb
from taskbalance import _constants
from taskbalance._constants import constant


def test_a_constant_is_made_once_per_value_shape_dtype_and_device() -> None:
    first = constant(2.5, (3,), torch.float32, torch.device("cpu"))
    assert torch.equal(first, torch.full((3,), 2.5))
    assert constant(2.5, (3,), torch.float32, torch.device("cpu")) is first
    assert constant(2.5, (3,), torch.float64, torch.device("cpu")) is not first
    assert constant(2.5, (4,), torch.float32, torch.device("cpu")) is not first
    assert constant(1.5, (3,), torch.float32, torch.device("cpu")) is not first


def test_a_constant_first_asked_for_in_inference_mode_is_an_ordinary_tensor(monkeypatch) -> None:
    monkeypatch.setattr(_constants, "_SHARED", {})  # made here, not by an earlier test
    with torch.inference_mode():
        mask = constant(True, (7,), torch.bool, torch.device("cpu"))
    assert not mask.is_inference()
    # autograd may save it: torch.where saves its condition for the backward
    x = torch.ones(7, requires_grad=True)
    torch.where(mask, x, 0).sum().backward()
    assert torch.equal(x.grad, torch.ones(7))


def test_a_constant_made_under_a_fake_tensor_mode_is_not_kept() -> None:
    with FakeTensorMode():
        fake = constant(3.25, (5,), torch.float32, torch.device("cpu"))
    real = constant(3.25, (5,), torch.float32, torch.device("cpu"))
    assert type(real) is torch.Tensor
    assert real is not fake
    assert torch.equal(real, torch.full((5,), 3.25))


def test_a_nan_constant_is_made_per_call() -> None:
    nan = float("nan")
    first = constant(nan, (2,), torch.float32, torch.device("cpu"))
    assert torch.isnan(first).all()
    assert constant(nan, (2,), torch.float32, torch.device("cpu")) is not first


def test_the_balancer_does_not_write_to_its_shared_constants() -> None:
    # every task present: the all-True mask is a shared constant; the state copies it
    b = tb.create("upgrad", num_tasks=3)
    z = torch.randn(4, 3, requires_grad=True)
    b(torch.stack([z[:, k].pow(2).mean() for k in range(3)]), features=z).backward()
    b(
        torch.stack([z[:, k].pow(2).mean() for k in range(3)]),
        features=z,
        present=torch.tensor([True, False, True]),
    ).backward()
    assert b._last_present.tolist() == [True, False, True]
    assert constant(True, (3,), torch.bool, torch.device("cpu")).all()


def test_a_shared_constant_modified_in_place_is_replaced_at_the_next_request() -> None:
    first = constant(4.5, (3,), torch.float32, torch.device("cpu"))
    first.mul_(2)  # what the contract forbids
    again = constant(4.5, (3,), torch.float32, torch.device("cpu"))
    assert again is not first
    assert torch.equal(again, torch.full((3,), 4.5))
    assert constant(4.5, (3,), torch.float32, torch.device("cpu")) is again


class _DoublesInPlace(torch.autograd.Function):
    """Identity whose backward scales its incoming gradient in place (forbidden, but seen)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.mul_(2)


def test_a_backward_that_modifies_its_incoming_gradient_is_refused_and_harms_no_later_call():
    z = torch.ones(1, 2, requires_grad=True)

    def losses(custom: bool) -> torch.Tensor:
        first = z[:, 0].sum()
        return torch.stack([_DoublesInPlace.apply(first) if custom else first, z[:, 1].sum()])

    with pytest.raises(ValueError, match="modified its incoming gradient in place"):
        tb.gramian(losses(custom=True), z)
    b = tb.create("upgrad", num_tasks=2)
    with pytest.raises(ValueError, match="modified its incoming gradient in place"):
        b(losses(custom=True), features=z)
    assert b.num_calls.item() == 0  # refused before any state changed
    # the shared seed it scaled is not reused: later calls are exact
    assert torch.equal(tb.gramian(losses(custom=False), z), torch.eye(2))
    assert torch.equal(tb.gramian(losses(custom=False), z), torch.eye(2))


def test_the_engine_keeps_a_gramian_finite_up_to_the_dtypes_maximum() -> None:
    z = torch.ones(1, 2, requires_grad=True)
    c = torch.tensor([1.5e19, 0.0])  # G_00 = 2.25e38 < float32's 3.4e38
    gram = tb.gramian(torch.stack([(c * z).sum(), z.sum()]), z)
    assert torch.isfinite(gram).all()
    assert gram[0, 0].item() == pytest.approx(2.25e38, rel=1e-6)
