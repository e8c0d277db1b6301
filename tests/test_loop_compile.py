"""torch.compile of a training step that calls a balancer (issue 8 item 7).

What compiles: the model's forward (and its backward, through AOTAutograd). What breaks: the
balancer call itself, once per call: ``Balancer.forward`` is ``torch.compiler.disable``d and
runs eagerly, because it branches on host copies of its step counters and reads the K loss
values on the host (to name a bad loss); traced, each new step count would be a guard and a
recompile at every call. Measured with dynamo's CompileCounter backend: one compiled frame in
all, whatever the number of steps, and the same weights as an eager run.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from conftest import make_balancer

K = 3


def _problem(name: str):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 5)
    heads = torch.nn.ModuleList([torch.nn.Linear(5, 1) for _ in range(K)])
    balancer = make_balancer(name, K)

    def step(x: torch.Tensor) -> torch.Tensor:
        z = trunk(x)
        losses = torch.stack([(head(z) ** 2).mean() + 0.1 for head in heads])
        return balancer(losses, features=z)

    return step, balancer


@pytest.mark.parametrize("name", ["ew", "dwa", "famo", "uw", "rlw", "mgda", "pcgrad"])
def test_compiled_step_does_not_recompile_after_warm_up(name):
    torch._dynamo.reset()
    counter = CompileCounter()
    eager_step, eager = _problem(name)
    step, balancer = _problem(name)
    compiled = torch.compile(step, backend=counter)
    frames = []
    for i in range(8):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(i))
        compiled(x).backward()
        eager_step(x).backward()
        frames.append(counter.frame_count)
        torch.testing.assert_close(balancer.weights, eager.weights)
    assert frames[-1] == frames[1], f"recompiled after warm-up: frames per step {frames}"
    assert int(balancer.num_steps) == 8


def _aot_problem(name: str, mode: str):
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 5)
    heads = torch.nn.ModuleList([torch.nn.Linear(5, 1) for _ in range(K)])
    params = {"params": list(trunk.parameters())} if mode == "params" else {}
    balancer = make_balancer(name, K, **params)

    def step(x: torch.Tensor) -> torch.Tensor:
        z = trunk(x)
        losses = torch.stack([(head(z) ** 2).mean() + 0.1 for head in heads])
        return balancer(losses, **({} if mode == "params" else {"features": z}))

    return step, balancer, trunk


@pytest.mark.parametrize("name", ["mgda", "upgrad"])
def test_compiled_step_through_aot_autograd(name):
    """With AOTAutograd (what inductor compiles through), z and the losses are sibling outputs
    of one compiled node: features mode is refused, saying why; parameters mode equals eager."""
    torch._dynamo.reset()
    step, _, _ = _aot_problem(name, "features")
    with pytest.raises(ValueError, match=r"features: .*compiled training step.*params="):
        torch.compile(step, backend="aot_eager")(torch.randn(6, 4))
    eager_step, eager, eager_trunk = _aot_problem(name, "params")
    step, balancer, trunk = _aot_problem(name, "params")
    compiled = torch.compile(step, backend="aot_eager")
    for i in range(3):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(i))
        compiled(x).backward()
        eager_step(x).backward()
        torch.testing.assert_close(balancer.weights, eager.weights)
        torch.testing.assert_close(trunk.weight.grad, eager_trunk.weight.grad)
