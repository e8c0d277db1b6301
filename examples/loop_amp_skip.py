"""AMP with a GradScaler: a step with a non-finite loss is skipped, balancer included.

With ``on_nonfinite="skip"`` a call whose losses (or task gradients) are not finite returns a
NaN objective and changes no state; its backward gives NaN gradients, so ``scaler.step``
skips the optimiser step and lowers the scale, exactly as for any overflow. Under DDP every
rank skips together. Here bf16 autocast runs on the CPU and one step's loss is forced to inf
(on a GPU use ``torch.autocast("cuda", dtype=torch.float16)``). Runs in seconds:

    python examples/loop_amp_skip.py
"""

from __future__ import annotations

import torch
from torch import nn

import taskbalance as tb

STEPS = 12
BAD_STEP = 5


def main() -> None:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(2)])
    balancer = tb.create("upgrad", num_tasks=2, on_nonfinite="skip")
    parameters = [*trunk.parameters(), *heads.parameters()]
    optimiser = torch.optim.SGD(parameters, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    directions = torch.randn(6, 2)

    skipped, unchanged = [], True
    for step in range(STEPS):
        inputs = torch.randn(32, 6)
        targets = inputs @ directions
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = trunk(inputs)
            predictions = [head(features).squeeze(1).float() for head in heads]
        losses = torch.stack([((p - targets[:, k]) ** 2).mean() for k, p in enumerate(predictions)])
        if step == BAD_STEP:
            losses = losses * torch.tensor([1.0, float("inf")])  # an overflow, as fp16 gives
        objective = balancer(losses, features=features)
        optimiser.zero_grad()
        before = [p.detach().clone() for p in parameters]
        scale = scaler.get_scale()
        scaler.scale(objective).backward()
        scaler.step(optimiser)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped.append(step)
            unchanged &= all(torch.equal(a, p) for a, p in zip(before, parameters, strict=True))

    print(f"skipped steps: {skipped}")
    print(f"balancer steps: {int(balancer.num_steps)} of {STEPS} calls")
    print(f"model unchanged by the skipped step: {unchanged}")


if __name__ == "__main__":
    main()
