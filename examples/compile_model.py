"""A balancer with torch.compile: compile the trunk and the heads, not the model that returns z.

A gradient method needs ``features=z``, the tensor the task heads consume. Compile a whole model
whose forward returns ``(z, head outputs)`` and the returned ``z`` is a new output of the
compiled graph: the heads read the graph's internal copy, no loss reaches the returned ``z``,
and the balancer refuses it with a ``ValueError`` naming ``features`` (before this was checked,
the Gramian was silently zero and MGDA/UPGrad returned uniform weights). Compile the trunk and
the heads as two graphs instead: ``z`` is then the output of one and the input of the other,
the losses reach it, and training gives the same weights as eager mode. The script checks both:

    python examples/compile_model.py [--backend inductor|aot_eager] [--method mgda]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import taskbalance as tb

STEPS = 5
K = 3


class Heads(nn.Module):
    """K task heads reading the shared features: ``[B, D] -> [B, K]``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(K)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([head(z) for head in self.heads], dim=1)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.heads = Heads(16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, self.heads(z)


def task_losses(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    scales = torch.tensor([1.0, 10.0, 0.1])  # tasks in different units, so the weights differ
    return torch.stack(
        [nn.functional.mse_loss(outputs[:, k], targets[:, k] * scales[k]) for k in range(K)]
    )


def train(model: Model, trunk, heads, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """STEPS steps of SGD; the balancer's weights of every step and the final parameters."""
    balancer = tb.create(method, num_tasks=K)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        x = torch.randn(32, 8, generator=data)
        targets = torch.randn(32, K, generator=data)
        z = trunk(x)  # the features the heads below consume
        losses = task_losses(heads(z), targets)
        optimizer.zero_grad()
        balancer(losses, features=z).backward()
        optimizer.step()
        history.append(balancer.weights)
    return torch.stack(history), torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--method", default="mgda", help="a gradient method (tb.available())")
    args = parser.parse_args()
    torch.manual_seed(0)
    eager = Model()
    compiled = copy.deepcopy(eager)

    # The pitfall: compile the whole model and take z from its outputs.
    whole = torch.compile(copy.deepcopy(eager), backend=args.backend)
    z, outputs = whole(torch.randn(4, 8))
    try:
        tb.create(args.method, num_tasks=K)(task_losses(outputs, torch.zeros(4, K)), features=z)
    except ValueError as error:
        print("whole-model compile refused:", ":".join(str(error).split(":")[:2]))
    else:
        raise SystemExit("whole-model compile was not refused")

    # The pattern: two compiled graphs, z between them.
    trunk = torch.compile(compiled.trunk, backend=args.backend)
    heads = torch.compile(compiled.heads, backend=args.backend)
    compiled_weights, compiled_params = train(compiled, trunk, heads, args.method)
    eager_weights, eager_params = train(eager, eager.trunk, eager.heads, args.method)

    weight_error = (compiled_weights - eager_weights).abs().max().item()
    param_error = (compiled_params - eager_params).abs().max().item()
    last = [round(w, 4) for w in eager_weights[-1].tolist()]
    print(f"{args.method} weights of the last step: {last}")
    print(
        f"largest difference from eager: weights {weight_error:.2e}, parameters {param_error:.2e}"
    )
    same = torch.allclose(compiled_weights, eager_weights, rtol=1e-4, atol=1e-5) and torch.allclose(
        compiled_params, eager_params, rtol=1e-4, atol=1e-5
    )
    print(f"compiled weights match eager weights: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
