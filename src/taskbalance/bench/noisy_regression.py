"""``noisy-regression``: K regression tasks ``y_k = f_k(x) + σ_k·n`` with known noise σ_k.

The inputs are ``x ~ U(−1, 1)^4``; the clean signals ``f_k(x) = sin(u_kᵀx) + 0.5·v_kᵀx`` are
smooth, so the default MLP fits them almost exactly and the training MSE of a fitted model
approaches σ_k², the value uncertainty weighting's ``e^{s_k}`` should learn. The training split
yields noisy targets; validation and test yield the clean signal, so the metric (MSE) says how
well the function was learned.
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance.bench.api import (
    Benchmark,
    Task,
    TrainingDefaults,
    mean_squared_error,
    reference_loss,
    register_benchmark,
    regression_kpi,
)
from taskbalance.bench.data import EVAL_BATCH_SIZE, TensorTaskDataset, generator
from taskbalance.bench.losses import mse
from taskbalance.bench.models import linear_heads, mlp_trunk

SIGMAS = (0.5, 2.0, 8.0)
INPUT_SIZE = 4
SIZES = (16384, 2048, 2048)
SMALL_SIZES = (512, 256, 256)
DESCRIPTION = "3 regression tasks with known noise σ = 0.5, 2, 8 (UW should recover σ²)"
DEFAULTS = TrainingDefaults(
    epochs=12, batch_size=256, lr=3e-3, balancer_lr=3e-2, eval_batch_size=EVAL_BATCH_SIZE
)


def signal(inputs: Tensor, weights: Tensor) -> Tensor:
    """The clean signal of each task: ``f_k(x) = sin(u_kᵀx) + 0.5·v_kᵀx``.

    Args:
        inputs: ``[N, D]`` inputs.
        weights: ``[K, 2, D]``: ``u_k`` and ``v_k`` for each task.

    Returns:
        ``[K, N]`` clean values.
    """
    frequency = torch.einsum("kd,nd->kn", weights[:, 0], inputs)
    slope = torch.einsum("kd,nd->kn", weights[:, 1], inputs)
    return torch.sin(frequency) + 0.5 * slope


def build(small: bool = False, data_seed: int = 0, sigmas: tuple[float, ...] = SIGMAS) -> Benchmark:
    """Build ``noisy-regression``.

    Args:
        small: a few hundred examples per split, for smoke tests.
        data_seed: seed of the signal weights, inputs and noise.
        sigmas: the noise standard deviations σ_k, one per task.

    Returns:
        The benchmark.
    """
    rng = generator(data_seed)
    num_tasks = len(sigmas)
    weights = torch.randn((num_tasks, 2, INPUT_SIZE), generator=rng)
    noise_scales = torch.tensor(sigmas, dtype=torch.float32)

    def make_split(count: int, noisy_targets: bool) -> TensorTaskDataset:
        inputs = 2 * torch.rand((count, INPUT_SIZE), generator=rng) - 1
        clean = signal(inputs, weights)
        noisy = clean + noise_scales[:, None] * torch.randn(clean.shape, generator=rng)
        data = TensorTaskDataset(inputs, tuple(noisy if noisy_targets else clean))
        # Kept for checks of the noise level (the training targets are the noisy ones).
        data.clean_targets = tuple(clean)
        return data

    sizes = SMALL_SIZES if small else SIZES
    train, validation, test = (
        make_split(count, noisy) for count, noisy in zip(sizes, (True, False, False), strict=True)
    )
    tasks = tuple(
        Task(
            f"y{i}",
            mse,
            (mean_squared_error(),),
            "regression",
            regression_kpi(reference_loss(target)),
            f"noise σ = {sigma:g}; metric MSE to the clean signal",
        )
        for i, (sigma, target) in enumerate(zip(sigmas, train.targets, strict=True))
    )

    def model() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        return (
            mlp_trunk(INPUT_SIZE, [64, 64], activation=torch.nn.Tanh),
            linear_heads(64, [1] * num_tasks),
        )

    return Benchmark(
        name="noisy-regression",
        tasks=tasks,
        train=train,
        validation=validation,
        test=test,
        model=model,
        defaults=DEFAULTS,
        description=DESCRIPTION,
        settings={"data_seed": data_seed, "small": small, "sigmas": list(sigmas)},
        noise_variances=tuple(sigma**2 for sigma in sigmas),
    )


register_benchmark(
    "noisy-regression",
    build,
    description=DESCRIPTION,
    tasks=("y0..y2: MSE on noisy targets; mse to the clean signal ↓",),
)
