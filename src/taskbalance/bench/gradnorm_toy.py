"""``gradnorm-toy``: GradNorm's synthetic regression (Chen et al., ICML 2018, §4).

``f_i(x) = σ_i·tanh((B + ε_i)·x)`` with ``B`` (100×250) entries ~ N(0, 10²), ``ε_i`` entries
~ N(0, 3.5²), T = 10 tasks, σ_i spread geometrically over [1, 100].

Input normalisation (our choice): the network sees ``x ~ N(0, I_250)`` and the targets use
``x / √(250·(10² + 3.5²))`` inside the tanh, so each pre-activation has unit variance; without
it tanh saturates and every target is ``σ_i·sign(·)``.

Metric (our choice): per task the test MSE divided by the variance of that task's training
targets (the loss of predicting the mean), ``nmse``; the headline number is their sum. The
paper divides by the untrained model's loss ``L_i(0)``, which depends on the initialisation;
a fixed divisor keeps a metric a function of the predictions alone and leaves Δm% unchanged
within a seed.
"""

from __future__ import annotations

import math

import torch

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

INPUT_SIZE = 250
OUTPUT_SIZE = 100
NUM_TASKS = 10
B_STD = 10.0
EPSILON_STD = 3.5
SIZES = (4000, 1000, 1000)
SMALL_SIZES = (256, 128, 128)
DESCRIPTION = "GradNorm's synthetic regression, 10 tasks with scales σ_i from 1 to 100"
DEFAULTS = TrainingDefaults(
    epochs=20, batch_size=100, lr=1e-3, balancer_lr=2e-2, eval_batch_size=EVAL_BATCH_SIZE
)


def sigmas(num_tasks: int = NUM_TASKS) -> list[float]:
    """The task scales σ_i, spread geometrically over [1, 100]."""
    return [100.0 ** (i / (num_tasks - 1)) for i in range(num_tasks)]


def model() -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """Trunk of 4 × 100 ReLU layers and one linear head per task, as in the paper."""
    return mlp_trunk(INPUT_SIZE, [100] * 4), linear_heads(100, [OUTPUT_SIZE] * NUM_TASKS)


def build(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build ``gradnorm-toy``.

    Args:
        small: a few hundred examples per split, for smoke tests.
        data_seed: seed of B, ε_i and the inputs.

    Returns:
        The benchmark.
    """
    rng = generator(data_seed)
    shape = (OUTPUT_SIZE, INPUT_SIZE)
    base = B_STD * torch.randn(shape, generator=rng)
    epsilons = EPSILON_STD * torch.randn((NUM_TASKS, *shape), generator=rng)
    scales = torch.tensor(sigmas())
    input_scale = 1.0 / math.sqrt(INPUT_SIZE * (B_STD**2 + EPSILON_STD**2))

    def make_split(count: int) -> TensorTaskDataset:
        inputs = torch.randn((count, INPUT_SIZE), generator=rng)
        pre_activations = torch.einsum("toi,ni->tno", base + epsilons, inputs * input_scale)
        outputs = scales[:, None, None] * torch.tanh(pre_activations)
        return TensorTaskDataset(inputs, tuple(outputs))

    sizes = SMALL_SIZES if small else SIZES
    train, validation, test = (make_split(count) for count in sizes)
    references = [reference_loss(target) for target in train.targets]
    tasks = tuple(
        Task(
            f"t{i}",
            mse,
            (mean_squared_error("nmse", scale=reference),),
            "regression",
            regression_kpi(reference),
            f"σ = {sigma:.3g}; metric MSE / Var(train targets)",
        )
        for i, (sigma, reference) in enumerate(zip(sigmas(), references, strict=True))
    )
    return Benchmark(
        name="gradnorm-toy",
        tasks=tasks,
        train=train,
        validation=validation,
        test=test,
        model=model,
        defaults=DEFAULTS,
        description=DESCRIPTION,
        settings={"data_seed": data_seed, "small": small, "sizes": list(sizes)},
        summary_name="Σ nmse",
    )


register_benchmark(
    "gradnorm-toy",
    build,
    description=DESCRIPTION,
    tasks=("t0..t9: MSE; nmse = MSE / Var(train targets) ↓",),
)
