"""Tests for taskbalance.optim: per-task parameter groups and stop_gradient."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import taskbalance.optim as optim
from taskbalance.optim import stop_gradient, task_param_groups


class TwoHeadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.seg = nn.Linear(8, 3)
        self.depth = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return self.seg(features), self.depth(features)


LR = {"shared": 1e-3, "seg": 1e-2, "depth": 5e-3}


def _groups(net: TwoHeadModel, **kwargs: object) -> list[dict]:
    return task_param_groups(shared=net.trunk, tasks={"seg": net.seg, "depth": net.depth}, **kwargs)


def _loss(model: TwoHeadModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    seg, depth = model(x)
    labels = torch.randint(0, 3, (16,), generator=g)
    return nn.functional.cross_entropy(seg, labels) + depth.square().mean()


def test_one_sgd_step_moves_each_group_with_its_learning_rate() -> None:
    model = TwoHeadModel()
    groups = _groups(model, lr=LR, model=model)
    assert [group["name"] for group in groups] == ["shared", "seg", "depth"]
    optimizer = torch.optim.SGD(groups)
    assert [group["name"] for group in optimizer.param_groups] == ["shared", "seg", "depth"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _loss(model).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    group_of = {"trunk": "shared", "seg": "seg", "depth": "depth"}
    for name, parameter in model.named_parameters():
        lr = LR[group_of[name.split(".")[0]]]
        expected = before[name].add(gradients[name], alpha=-lr)  # Δθ = −lr_group · grad
        assert torch.equal(parameter.detach(), expected), name
        assert gradients[name].abs().sum() > 0


def test_weight_decay_per_group_and_any_optimizer() -> None:
    model = TwoHeadModel()
    groups = _groups(model, lr=0.1, weight_decay={"seg": 0.5}, model=model)
    assert [group["lr"] for group in groups] == [0.1, 0.1, 0.1]
    assert [group.get("weight_decay") for group in groups] == [None, 0.5, None]
    optimizer = torch.optim.SGD(groups, weight_decay=0.0)
    before = model.seg.weight.detach().clone()
    _loss(model).backward()
    gradient = model.seg.weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(model.seg.weight.detach(), before - 0.1 * (gradient + 0.5 * before))
    adam = torch.optim.Adam(_groups(model, lr=LR, weight_decay=1e-4))
    assert [group["weight_decay"] for group in adam.param_groups] == [1e-4] * 3
    assert [group["lr"] for group in adam.param_groups] == [1e-3, 1e-2, 5e-3]


def test_duplicate_parameter_is_rejected() -> None:
    model = TwoHeadModel()
    with pytest.raises(
        ValueError,
        match=r"parameter 'shared\.seg\.weight' \(shape \(3, 8\)\) appears in both "
        r"group 'shared' and group 'seg'",
    ):
        task_param_groups(shared=model, tasks={"seg": model.seg}, lr=1e-3)
    weight = model.depth.weight
    with pytest.raises(ValueError, match=r"appears twice in group 'depth'"):
        task_param_groups(shared=None, tasks={"depth": [weight, weight]}, lr=1e-3)


def test_left_out_and_foreign_parameters_are_rejected() -> None:
    model = TwoHeadModel()
    with pytest.raises(
        ValueError,
        match=r"2 trainable parameter\(s\) of model are in no group: 'depth.weight', 'depth.bias'",
    ):
        task_param_groups(shared=model.trunk, tasks={"seg": model.seg}, lr=1e-3, model=model)
    stranger = nn.Linear(2, 2)
    with pytest.raises(
        ValueError, match=r"parameter 'extra\.weight' of group 'extra' is not a trainable parameter"
    ):
        task_param_groups(
            shared=model.trunk,
            tasks={"seg": model.seg, "depth": model.depth, "extra": stranger},
            lr=1e-3,
            model=model,
        )


def test_frozen_parameters_are_skipped() -> None:
    model = TwoHeadModel()
    model.trunk.requires_grad_(False)
    groups = _groups(model, lr=LR, model=model)  # the frozen trunk is not "left out"
    assert [group["name"] for group in groups] == ["seg", "depth"]
    model.depth.bias.requires_grad_(False)
    groups = _groups(model, lr=LR, model=model)
    assert [len(group["params"]) for group in groups] == [2, 1]


def test_bad_learning_rate_and_group_arguments() -> None:
    model = TwoHeadModel()
    with pytest.raises(
        ValueError, match=r"lr: expected one key per group .* no entry for groups \['depth'\]"
    ):
        _groups(model, lr={"shared": 1e-3, "seg": 1e-2})
    with pytest.raises(ValueError, match=r"lr: expected keys among .* unknown groups \['dpeth'\]"):
        _groups(model, lr={**LR, "dpeth": 1.0})
    with pytest.raises(ValueError, match=r"weight_decay: expected keys .* unknown groups \['x'\]"):
        _groups(model, lr=LR, weight_decay={"x": 0.1})
    with pytest.raises(ValueError, match=r"tasks: expected task names other than 'shared'"):
        task_param_groups(shared=model.trunk, tasks={"shared": model.seg}, lr=1e-3)
    with pytest.raises(TypeError, match=r"group 'seg': expected an nn.Module or an iterable"):
        task_param_groups(shared=None, tasks={"seg": model.seg.weight}, lr=1e-3)
    with pytest.raises(ValueError, match="no parameter groups"):
        task_param_groups(shared=None, tasks={}, lr=1e-3)


def test_stop_gradient_keeps_a_term_out_of_backward() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    total = (x**2).sum() + stop_gradient(x**3).sum()
    total.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    assert not stop_gradient(x).requires_grad
    assert stop_gradient(x).data_ptr() == x.data_ptr()  # a view, no copy
    with pytest.raises(TypeError, match=r"x: expected a tensor, got float"):
        stop_gradient(1.0)


def test_module_doctests() -> None:
    assert doctest.testmod(optim).failed == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": None}, TypeError, r"lr: expected a number or a mapping"),
        ({"lr": -0.1}, ValueError, r"lr: expected a number >= 0, got -0.1"),
        ({"lr": float("nan")}, ValueError, r"lr: expected a finite number"),
        ({"lr": "0.1"}, TypeError, r"lr: expected a real number, got '0.1'"),
        ({"lr": [0.1, 0.2]}, TypeError, r"lr: expected a real number"),
        ({"lr": {"shared": "fast", "a": 0.1}}, TypeError, r"lr\['shared'\]: expected a real"),
        ({"lr": 0.1, "weight_decay": -1.0}, ValueError, r"weight_decay: expected a number >= 0"),
    ],
)
def test_bad_learning_rates_and_decays_are_refused_by_name(kwargs, error, message):
    """torch.optim checks a group's lr only where it builds the default: these reached the
    optimiser (a negative or NaN lr) or failed with an unnamed KeyError/ValueError."""
    with pytest.raises(error, match=message):
        task_param_groups(nn.Linear(2, 2), {"a": nn.Linear(2, 1)}, **kwargs)


def test_tasks_must_be_a_mapping():
    with pytest.raises(TypeError, match=r"tasks: expected a mapping task name -> module"):
        task_param_groups(nn.Linear(2, 2), [nn.Linear(2, 1)], lr=0.1)  # type: ignore[arg-type]


def test_numpy_scalars_and_one_element_tensors_are_learning_rates():
    """As torch.optim takes them (a review found the first checks refused them)."""
    np = pytest.importorskip("numpy")
    for lr in (torch.tensor(0.25), np.float32(0.25), np.int64(1)):
        groups = task_param_groups(nn.Linear(2, 2), {"a": nn.Linear(2, 1)}, lr=lr)
        assert [group["lr"] for group in groups] == [float(lr)] * 2
    mixed = {"shared": np.float64(0.5), "a": torch.tensor(0.125)}
    groups = task_param_groups(nn.Linear(2, 2), {"a": nn.Linear(2, 1)}, lr=mixed)
    assert [group["lr"] for group in groups] == [0.5, 0.125]
    with pytest.raises(TypeError, match=r"lr: expected a real number"):
        task_param_groups(nn.Linear(2, 2), {"a": nn.Linear(2, 1)}, lr=torch.tensor(True))
