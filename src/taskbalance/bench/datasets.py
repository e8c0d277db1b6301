"""The bundled benchmarks, built locally from scikit-learn's bundled digits or from formulas.

Nothing is downloaded. Each benchmark has fixed train/validation/test splits (drawn from a data
seed that does not change with the training seed, so every run sees the same data), a list of
tasks with their loss and metric (and whether higher or lower is better), training defaults and
a default hard-parameter-sharing model.

- ``multidigits``: two sklearn digits on a 12×12 canvas (left at the top-left, right offset by
  4 px in both directions, pixelwise max); tasks: left digit and right digit (cross-entropy;
  accuracy). The 1,797 images are split first and pairs are composed within each split, so no
  image appears in two splits.
- ``digits-mixed``: one noisy digit, four tasks of different kinds and scales: class (CE;
  accuracy), parity (BCE; accuracy), ink mass (MSE in raw pixel units, in the hundreds; mean
  absolute error) and denoising reconstruction (MSE; MSE).
- ``gradnorm-toy``: GradNorm's synthetic regression ``f_i(x) = σ_i·tanh((B + ε_i)·x)``.
- ``noisy-regression``: K regression tasks with known noise σ_k; uncertainty weighting should
  recover σ_k².
- ``toy-2d``: the two-objective landscape of the CAGrad/Nash-MTL papers (see
  :mod:`taskbalance.bench.toy`); it has no data set and is driven by ``taskbalance toy``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional

from taskbalance.bench.models import MultiTaskModel, linear_heads, mlp_trunk

LossName = Literal["cross_entropy", "binary_cross_entropy", "mse"]
MetricName = Literal["accuracy", "mae", "mse", "normalised_loss", "objective"]

BENCH_EXTRA_HINT = "pip install 'taskbalance[bench]'"

#: Fractions of the source data given to train, validation and test.
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


class MissingExtraError(ImportError):
    """An optional dependency of the benchmark suite (the ``[bench]`` extra) is missing."""


def require_module(module_name: str) -> ModuleType:
    """Import an optional dependency of the benchmark suite, or explain how to install it.

    Args:
        module_name: the module to import, e.g. ``"sklearn.datasets"``.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the module is not installed.
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        top_level = module_name.split(".")[0]
        raise MissingExtraError(
            f"the benchmarks need {top_level!r}, which is not installed: {BENCH_EXTRA_HINT}"
        ) from error


@dataclass(frozen=True)
class Task:
    """One task of a benchmark: its loss, its metric and the metric's direction.

    Args:
        name: short task name.
        loss: the training loss.
        metric: the evaluation metric.
        higher_is_better: the metric's direction (δ_m = 1 in Δm% when True).
        output_size: size of the head's output.
        kind: ``"classification"`` or ``"regression"`` (what uncertainty weighting is told).
        description: one line for ``taskbalance list``.
        reference_loss: the loss of predicting the training mean (regression), used to turn a
            regression loss into a KPI in [0, 1] as ``exp(−loss / reference_loss)``.
    """

    name: str
    loss: LossName
    metric: MetricName
    higher_is_better: bool
    output_size: int
    kind: Literal["classification", "regression"]
    description: str
    reference_loss: float = 1.0

    @property
    def direction(self) -> str:
        """``"higher"`` or ``"lower"``: which metric values are better."""
        return "higher" if self.higher_is_better else "lower"

    def loss_value(self, output: Tensor, target: Tensor) -> Tensor:
        """The task's training loss on a batch (a 0-d tensor in the graph).

        Args:
            output: the head's output, ``[N, output_size]``.
            target: class indices (cross-entropy), 0/1 labels (binary) or values (MSE).

        Returns:
            The mean loss over the batch.
        """
        if self.loss == "cross_entropy":
            return functional.cross_entropy(output, target)
        if self.loss == "binary_cross_entropy":
            return functional.binary_cross_entropy_with_logits(output.reshape(-1), target)
        return functional.mse_loss(output.reshape(target.shape), target)

    def kpi(self, output: Tensor, target: Tensor, loss: Tensor) -> float:
        """A batch score in [0, 1] for methods that read KPIs (DTP).

        Classification: the batch accuracy. Regression: ``exp(−loss / reference_loss)``, which
        is 1 for a perfect fit and ``e^{−1}`` for predicting the training mean.
        """
        if self.kind == "classification":
            return float(self._correct(output, target).float().mean())
        return math.exp(-float(loss.detach()) / self.reference_loss)

    def metric_value(self, output: Tensor, target: Tensor, initial_loss: float = 1.0) -> float:
        """The task's evaluation metric on a whole split.

        Args:
            output: the head's output on the split.
            target: the split's targets for this task.
            initial_loss: for ``normalised_loss``, the loss of the untrained model on the same
                split (``L_i(0)``).

        Returns:
            The metric as a float.
        """
        if self.metric == "accuracy":
            return float(self._correct(output, target).float().mean())
        prediction = output.reshape(target.shape)
        if self.metric == "mae":
            return float((prediction - target).abs().mean())
        mse = float(functional.mse_loss(prediction, target))
        if self.metric == "normalised_loss":
            return mse / initial_loss
        return mse

    def _correct(self, output: Tensor, target: Tensor) -> Tensor:
        if self.loss == "binary_cross_entropy":
            return (output.reshape(-1) > 0).float() == target
        return output.argmax(dim=1) == target


@dataclass(frozen=True)
class Split:
    """One split of a benchmark.

    Args:
        inputs: the model inputs, first dimension N.
        targets: one target tensor per task, each with first dimension N.
        metric_targets: targets the metrics are computed against when they differ from the
            training targets (``noisy-regression`` scores the clean signal); None otherwise.
        source_ids: indices of the source images each example is made of (``[N]`` or
            ``[N, 2]``), for the digits benchmarks; None for synthetic data.
    """

    inputs: Tensor
    targets: tuple[Tensor, ...]
    metric_targets: tuple[Tensor, ...] | None = None
    source_ids: Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def evaluation_targets(self) -> tuple[Tensor, ...]:
        """The targets the metrics are computed against."""
        return self.metric_targets if self.metric_targets is not None else self.targets


@dataclass(frozen=True)
class TrainingDefaults:
    """Training budget and optimiser settings of a benchmark (Adam, cosine-decayed lr).

    Args:
        epochs: passes over the training split.
        batch_size: examples per step.
        lr: Adam learning rate of the model.
        balancer_lr: Adam learning rate of a balancer's own parameters (UW, IMTL-L).
    """

    epochs: int
    batch_size: int
    lr: float
    balancer_lr: float


@dataclass(frozen=True)
class Benchmark:
    """A built benchmark: data, tasks, training defaults and the default model.

    Args:
        name: registry name.
        description: one line.
        tasks: the tasks, in head order.
        train: training split.
        validation: validation split.
        test: test split.
        build_model: returns a freshly initialised default model (seed torch first).
        defaults: training budget and optimiser settings.
        noise_variances: the true noise variances σ_k² (``noisy-regression``), else None.
        summary_name: name of the sum of the per-task metrics when that sum is the benchmark's
            headline number (``gradnorm-toy``: ``Σ L_i/L_i(0)``), else None.
    """

    name: str
    description: str
    tasks: tuple[Task, ...]
    train: Split
    validation: Split
    test: Split
    build_model: Callable[[], MultiTaskModel]
    defaults: TrainingDefaults
    noise_variances: tuple[float, ...] | None = None
    summary_name: str | None = None

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return len(self.tasks)


@dataclass(frozen=True)
class BenchmarkInfo:
    """What ``taskbalance list`` shows about a benchmark, and how to build it.

    Args:
        name: registry name.
        description: one line.
        tasks: the tasks (with placeholder reference losses until built).
        builder: ``builder(small, data_seed)`` returns the :class:`Benchmark`; None for
            ``toy-2d``, which has no data set.
    """

    name: str
    description: str
    tasks: tuple[Task, ...]
    builder: Callable[[bool, int], Benchmark] | None


# ---------------------------------------------------------------------------------------------
# Helpers.


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def split_indices(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """A seeded permutation of ``range(count)`` cut into train/validation/test by
    :data:`SPLIT_FRACTIONS`.

    Args:
        count: number of source items.
        generator: the random generator.

    Returns:
        Three disjoint index tensors whose union is ``range(count)``.
    """
    order = torch.randperm(count, generator=generator)
    train_end = round(count * SPLIT_FRACTIONS[0])
    validation_end = train_end + round(count * SPLIT_FRACTIONS[1])
    return order[:train_end], order[train_end:validation_end], order[validation_end:]


def _load_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 sklearn digits as raw ``[N, 8, 8]`` pixel values in 0..16, and the labels."""
    datasets = require_module("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


def _regression_reference(target: Tensor) -> float:
    """The MSE of predicting the mean of ``target`` (per output, averaged)."""
    return max(float(target.var(dim=0, unbiased=False).mean()), 1e-12)


def _with_reference_losses(tasks: tuple[Task, ...], train: Split) -> tuple[Task, ...]:
    return tuple(
        replace(task, reference_loss=_regression_reference(target))
        if task.kind == "regression"
        else task
        for task, target in zip(tasks, train.targets, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# multidigits.

MULTIDIGITS_SIDE = 12
MULTIDIGITS_OFFSET = 4
MULTIDIGITS_PAIRS = (6000, 1500, 1500)
MULTIDIGITS_SMALL_PAIRS = (256, 128, 128)

MULTIDIGITS_TASKS = (
    Task("left", "cross_entropy", "accuracy", True, 10, "classification", "digit at the top-left"),
    Task("right", "cross_entropy", "accuracy", True, 10, "classification", "digit offset by 4 px"),
)


def compose_pairs(images: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Two 8×8 digits on a 12×12 canvas: left at the top-left, right offset by 4 px in both
    directions, combined by pixelwise max.

    Args:
        images: ``[N, 8, 8]`` source images.
        left: indices of the left digits.
        right: indices of the right digits.

    Returns:
        ``[len(left), 12, 12]`` canvases.
    """
    count = left.shape[0]
    top_left = torch.zeros(count, MULTIDIGITS_SIDE, MULTIDIGITS_SIDE)
    offset = torch.zeros(count, MULTIDIGITS_SIDE, MULTIDIGITS_SIDE)
    top_left[:, :8, :8] = images[left]
    offset[:, MULTIDIGITS_OFFSET:, MULTIDIGITS_OFFSET:] = images[right]
    return torch.maximum(top_left, offset)


def _pair_split(
    images: Tensor, labels: Tensor, pool: Tensor, count: int, generator: torch.Generator
) -> Split:
    """``count`` pairs of two distinct images, both drawn from ``pool`` only."""
    size = pool.shape[0]
    left_positions = torch.randint(size, (count,), generator=generator)
    # A shift in 1..size-1 makes the right image always differ from the left one.
    shifts = torch.randint(1, size, (count,), generator=generator)
    left = pool[left_positions]
    right = pool[(left_positions + shifts) % size]
    inputs = compose_pairs(images, left, right)
    return Split(
        inputs=inputs,
        targets=(labels[left], labels[right]),
        source_ids=torch.stack([left, right], dim=1),
    )


def _multidigits_model() -> MultiTaskModel:
    return MultiTaskModel(
        mlp_trunk(MULTIDIGITS_SIDE * MULTIDIGITS_SIDE, [256, 128]), linear_heads(128, [10, 10])
    )


def build_multidigits(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build ``multidigits`` (see the module docstring).

    Args:
        small: a few hundred pairs per split, for smoke tests.
        data_seed: seed of the image split and of the pairing.

    Returns:
        The benchmark.
    """
    raw_images, labels = _load_digits()
    images = raw_images / 16.0
    generator = _generator(data_seed)
    pools = split_indices(images.shape[0], generator)
    counts = MULTIDIGITS_SMALL_PAIRS if small else MULTIDIGITS_PAIRS
    train, validation, test = (
        _pair_split(images, labels, pool, count, generator)
        for pool, count in zip(pools, counts, strict=True)
    )
    return Benchmark(
        name="multidigits",
        description=BENCHMARKS["multidigits"].description,
        tasks=MULTIDIGITS_TASKS,
        train=train,
        validation=validation,
        test=test,
        build_model=_multidigits_model,
        defaults=TrainingDefaults(epochs=8, batch_size=128, lr=2e-3, balancer_lr=2e-2),
    )


# ---------------------------------------------------------------------------------------------
# digits-mixed.

DIGITS_MIXED_INPUT_NOISE = 0.3

DIGITS_MIXED_TASKS = (
    Task("digit", "cross_entropy", "accuracy", True, 10, "classification", "class 0-9"),
    Task("parity", "binary_cross_entropy", "accuracy", True, 1, "classification", "odd digit"),
    Task("ink", "mse", "mae", False, 1, "regression", "ink mass, raw pixel units (hundreds)"),
    Task("denoise", "mse", "mse", False, 64, "regression", "clean image from the noisy input"),
)


def _digits_mixed_split(
    images: Tensor, raw_images: Tensor, labels: Tensor, pool: Tensor, generator: torch.Generator
) -> Split:
    clean = images[pool].reshape(-1, 64)
    noisy = clean + DIGITS_MIXED_INPUT_NOISE * torch.randn(clean.shape, generator=generator)
    label = labels[pool]
    return Split(
        inputs=noisy,
        targets=(label, (label % 2).float(), raw_images[pool].sum(dim=(1, 2)), clean),
        source_ids=pool,
    )


def _digits_mixed_model() -> MultiTaskModel:
    return MultiTaskModel(mlp_trunk(64, [128, 128]), linear_heads(128, [10, 1, 1, 64]))


def build_digits_mixed(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build ``digits-mixed`` (see the module docstring).

    The input is the digit scaled to [0, 1] plus fixed Gaussian noise (σ = 0.3); the ink mass
    target is the sum of the raw 0..16 pixel values (around 300), deliberately left unscaled.

    Args:
        small: at most 256 images per split, for smoke tests.
        data_seed: seed of the split and of the input noise.

    Returns:
        The benchmark.
    """
    raw_images, labels = _load_digits()
    images = raw_images / 16.0
    generator = _generator(data_seed)
    pools = split_indices(images.shape[0], generator)
    if small:
        pools = tuple(pool[:256] for pool in pools)
    train, validation, test = (
        _digits_mixed_split(images, raw_images, labels, pool, generator) for pool in pools
    )
    return Benchmark(
        name="digits-mixed",
        description=BENCHMARKS["digits-mixed"].description,
        tasks=_with_reference_losses(DIGITS_MIXED_TASKS, train),
        train=train,
        validation=validation,
        test=test,
        build_model=_digits_mixed_model,
        defaults=TrainingDefaults(epochs=30, batch_size=64, lr=2e-3, balancer_lr=2e-2),
    )


# ---------------------------------------------------------------------------------------------
# gradnorm-toy.

GRADNORM_INPUT_SIZE = 250
GRADNORM_OUTPUT_SIZE = 100
GRADNORM_NUM_TASKS = 10
GRADNORM_B_STD = 10.0
GRADNORM_EPSILON_STD = 3.5
GRADNORM_SIZES = (4000, 1000, 1000)
GRADNORM_SMALL_SIZES = (256, 128, 128)


def gradnorm_sigmas(num_tasks: int = GRADNORM_NUM_TASKS) -> list[float]:
    """The task scales σ_i, spread geometrically over [1, 100]."""
    return [100.0 ** (i / (num_tasks - 1)) for i in range(num_tasks)]


GRADNORM_TASKS = tuple(
    Task(
        f"t{i}",
        "mse",
        "normalised_loss",
        False,
        GRADNORM_OUTPUT_SIZE,
        "regression",
        f"σ = {sigma:.3g}; metric L_i / L_i(0) on the split",
    )
    for i, sigma in enumerate(gradnorm_sigmas())
)


def _gradnorm_model() -> MultiTaskModel:
    return MultiTaskModel(
        mlp_trunk(GRADNORM_INPUT_SIZE, [100] * 4),
        linear_heads(100, [GRADNORM_OUTPUT_SIZE] * GRADNORM_NUM_TASKS),
    )


def build_gradnorm_toy(small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build ``gradnorm-toy``: GradNorm's synthetic regression (Chen et al., ICML 2018, §4).

    ``f_i(x) = σ_i·tanh((B + ε_i)·x)`` with ``B`` (100×250) entries ~ N(0, 10²), ``ε_i``
    entries ~ N(0, 3.5²), T = 10 tasks, σ_i spread geometrically over [1, 100].

    Input normalisation (our choice): the network sees ``x ~ N(0, I_250)`` (unit variance per
    element), and the targets use ``x / √(250·(10² + 3.5²))`` inside the tanh, so each
    pre-activation has unit variance. Without it the pre-activations have standard deviation
    ≈ 170, tanh saturates and every target is ``σ_i·sign(·)``.

    Metric: per task ``L_i / L_i(0)``, the test MSE over the untrained model's test MSE; the
    headline number is their sum ``Σ L_i / L_i(0)``.

    Args:
        small: a few hundred examples per split, for smoke tests.
        data_seed: seed of B, ε_i and the inputs.

    Returns:
        The benchmark.
    """
    generator = _generator(data_seed)
    shape = (GRADNORM_OUTPUT_SIZE, GRADNORM_INPUT_SIZE)
    base = GRADNORM_B_STD * torch.randn(shape, generator=generator)
    epsilons = GRADNORM_EPSILON_STD * torch.randn((GRADNORM_NUM_TASKS, *shape), generator=generator)
    sigmas = torch.tensor(gradnorm_sigmas())
    scale = 1.0 / math.sqrt(GRADNORM_INPUT_SIZE * (GRADNORM_B_STD**2 + GRADNORM_EPSILON_STD**2))

    def make_split(count: int) -> Split:
        inputs = torch.randn((count, GRADNORM_INPUT_SIZE), generator=generator)
        pre_activations = torch.einsum("toi,ni->tno", base + epsilons, inputs * scale)
        outputs = sigmas[:, None, None] * torch.tanh(pre_activations)
        return Split(inputs=inputs, targets=tuple(outputs))

    sizes = GRADNORM_SMALL_SIZES if small else GRADNORM_SIZES
    train, validation, test = (make_split(count) for count in sizes)
    return Benchmark(
        name="gradnorm-toy",
        description=BENCHMARKS["gradnorm-toy"].description,
        tasks=_with_reference_losses(GRADNORM_TASKS, train),
        train=train,
        validation=validation,
        test=test,
        build_model=_gradnorm_model,
        defaults=TrainingDefaults(epochs=20, batch_size=100, lr=1e-3, balancer_lr=2e-2),
        summary_name="Σ L_i/L_i(0)",
    )


# ---------------------------------------------------------------------------------------------
# noisy-regression.

NOISY_REGRESSION_SIGMAS = (0.5, 2.0, 8.0)
NOISY_REGRESSION_INPUT_SIZE = 4
NOISY_REGRESSION_SIZES = (16384, 2048, 2048)
NOISY_REGRESSION_SMALL_SIZES = (512, 256, 256)

NOISY_REGRESSION_TASKS = tuple(
    Task(
        f"y{i}",
        "mse",
        "mse",
        False,
        1,
        "regression",
        f"noise σ = {sigma:g}; metric MSE to the clean signal",
    )
    for i, sigma in enumerate(NOISY_REGRESSION_SIGMAS)
)


def noisy_regression_signal(inputs: Tensor, weights: Tensor) -> Tensor:
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


def build_noisy_regression(
    small: bool = False,
    data_seed: int = 0,
    sigmas: tuple[float, ...] = NOISY_REGRESSION_SIGMAS,
) -> Benchmark:
    """Build ``noisy-regression``: K tasks ``y_k = f_k(x) + σ_k·n``, ``n ~ N(0, 1)``.

    The inputs are ``x ~ U(−1, 1)^4``; the clean signals (see :func:`noisy_regression_signal`)
    are smooth, so the default MLP fits them almost exactly and the training MSE of a fitted
    model approaches σ_k², the value uncertainty weighting's ``e^{s_k}`` should learn. Metrics
    are MSEs against the clean signal (how well the function was learned).

    Args:
        small: a few hundred examples per split, for smoke tests.
        data_seed: seed of the signal weights, inputs and noise.
        sigmas: the noise standard deviations σ_k, one per task.

    Returns:
        The benchmark.
    """
    generator = _generator(data_seed)
    num_tasks = len(sigmas)
    weights = torch.randn((num_tasks, 2, NOISY_REGRESSION_INPUT_SIZE), generator=generator)
    noise_scales = torch.tensor(sigmas, dtype=torch.float32)

    def make_split(count: int) -> Split:
        inputs = 2 * torch.rand((count, NOISY_REGRESSION_INPUT_SIZE), generator=generator) - 1
        clean = noisy_regression_signal(inputs, weights)
        noisy = clean + noise_scales[:, None] * torch.randn(clean.shape, generator=generator)
        return Split(inputs=inputs, targets=tuple(noisy), metric_targets=tuple(clean))

    sizes = NOISY_REGRESSION_SMALL_SIZES if small else NOISY_REGRESSION_SIZES
    train, validation, test = (make_split(count) for count in sizes)
    tasks = NOISY_REGRESSION_TASKS
    if len(sigmas) != len(tasks):
        tasks = tuple(
            Task(f"y{i}", "mse", "mse", False, 1, "regression", f"noise σ = {sigma:g}")
            for i, sigma in enumerate(sigmas)
        )

    def build_model() -> MultiTaskModel:
        return MultiTaskModel(
            mlp_trunk(NOISY_REGRESSION_INPUT_SIZE, [64, 64], activation=torch.nn.Tanh),
            linear_heads(64, [1] * num_tasks),
        )

    return Benchmark(
        name="noisy-regression",
        description=BENCHMARKS["noisy-regression"].description,
        tasks=_with_reference_losses(tasks, train),
        train=train,
        validation=validation,
        test=test,
        build_model=build_model,
        defaults=TrainingDefaults(epochs=12, batch_size=256, lr=3e-3, balancer_lr=3e-2),
        noise_variances=tuple(sigma**2 for sigma in sigmas),
    )


# ---------------------------------------------------------------------------------------------
# The list.

TOY_2D_TASKS = (
    Task("f1", "mse", "objective", False, 1, "regression", "first objective of the landscape"),
    Task("f2", "mse", "objective", False, 1, "regression", "second objective of the landscape"),
)

BENCHMARKS: dict[str, BenchmarkInfo] = {
    "multidigits": BenchmarkInfo(
        "multidigits",
        "two overlapping sklearn digits on a 12×12 canvas (MultiMNIST analogue)",
        MULTIDIGITS_TASKS,
        build_multidigits,
    ),
    "digits-mixed": BenchmarkInfo(
        "digits-mixed",
        "one noisy digit; class, parity, ink mass and denoising: mixed kinds and scales",
        DIGITS_MIXED_TASKS,
        build_digits_mixed,
    ),
    "gradnorm-toy": BenchmarkInfo(
        "gradnorm-toy",
        "GradNorm's synthetic regression, 10 tasks with scales σ_i from 1 to 100",
        GRADNORM_TASKS,
        build_gradnorm_toy,
    ),
    "noisy-regression": BenchmarkInfo(
        "noisy-regression",
        "3 regression tasks with known noise σ = 0.5, 2, 8 (UW should recover σ²)",
        NOISY_REGRESSION_TASKS,
        build_noisy_regression,
    ),
    "toy-2d": BenchmarkInfo(
        "toy-2d",
        "two conflicting objectives on a 2-D plane (CAGrad/Nash-MTL toy); `taskbalance toy`",
        TOY_2D_TASKS,
        None,
    ),
}


def benchmark_names() -> list[str]:
    """Names of every bundled benchmark, in a fixed order."""
    return list(BENCHMARKS)


def benchmark_info(name: str) -> BenchmarkInfo:
    """The :class:`BenchmarkInfo` of ``name``; a ValueError lists the valid names otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {benchmark_names()}")
    return BENCHMARKS[name]


def load_benchmark(name: str, *, small: bool = False, data_seed: int = 0) -> Benchmark:
    """Build a bundled benchmark with its fixed, seeded splits.

    Args:
        name: a name from :func:`benchmark_names` (not ``toy-2d``, which has no data).
        small: small splits for smoke tests.
        data_seed: seed of the splits and of any generated data (fixed across training seeds).

    Returns:
        The benchmark.

    Raises:
        ValueError: unknown name, or ``toy-2d``.
        MissingExtraError: scikit-learn is needed and missing.
    """
    info = benchmark_info(name)
    if info.builder is None:
        raise ValueError(f"{name!r} has no data set; run it with `taskbalance toy`")
    return info.builder(small, data_seed)
