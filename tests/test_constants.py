"""The shared read-only constants of a training step (taskbalance._constants)."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import taskbalance as tb
from taskbalance._constants import constant


def test_a_constant_is_made_once_per_value_shape_dtype_and_device() -> None:
    first = constant(2.5, (3,), torch.float32, torch.device("cpu"))
    assert torch.equal(first, torch.full((3,), 2.5))
    assert constant(2.5, (3,), torch.float32, torch.device("cpu")) is first
    assert constant(2.5, (3,), torch.float64, torch.device("cpu")) is not first
    assert constant(2.5, (4,), torch.float32, torch.device("cpu")) is not first
    assert constant(1.5, (3,), torch.float32, torch.device("cpu")) is not first


def test_a_constant_first_asked_for_in_inference_mode_is_an_ordinary_tensor() -> None:
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
