"""Step-time overhead of every balancer, measured side by side on this machine.

One training step = zero_grad, forward (3×256 ReLU MLP trunk + K linear heads, MSE losses),
the balancer, one backward, an SGD step. Every variant (method × mode) trains its own copy of
the same model on the same fixed batch; for each K the variants are run round-robin, one step
each per round in a fresh random order, so load from other processes hits all of them alike;
the median over the timed rounds is reported. The references the ratios divide by (``ew`` and
the lower bounds) run as three independent copies whose samples are pooled.

Reported, for each K:

- loss-based methods relative to equal weighting (``ew``);
- gradient methods in features mode relative to the hand-written loop (K ``autograd.grad``
  calls, ``G``, fixed weights, one backward, SGD step) and to ``ew``; the methods whose heads keep
  their own gradients (``heads="unweighted"``) also relative to the same loop with those heads;
- gradient methods in parameters mode (params = the whole trunk) relative to the hand-written
  batched-autograd lower bound (forward, one ``autograd.grad(..., is_grads_batched=True)``,
  ``G = Σ J Jᵀ``, fixed weights, one backward, SGD step) and to ``ew``;
- torchjd's ``mtl_backward`` + ``jac_to_grad`` for the same method, when torchjd is installed.

Run ``python benchmarks/overhead.py --help`` for the flags; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

try:
    import taskbalance as tb
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import taskbalance as tb
from taskbalance.methods._facts import method_facts

try:
    import torchjd
    from torchjd import aggregation as jd_aggregation
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # optional
    torchjd = None

DIM_IN = 64
WIDTH = 256
BATCH = 256
LR = 1e-3
#: Parameters mode with ``reuse_rows=True`` (timed beside torchjd, which works that way).
REUSE_MODE = "params+reuse"
#: Independent copies of each reference variant (``ew`` and the lower bounds) run every round;
#: their samples are pooled. A reference's error moves every ratio in its column at once, so
#: its median is taken over three times as many samples as a method's.
REFERENCE_COPIES = 3
#: The features-mode hand-written loop whose heads keep their own gradients.
UNWEIGHTED_LOWER_BOUND = "lower_bound_loop_unweighted/features"

#: taskbalance name -> factory of the torchjd aggregator for the same method.
TORCHJD_AGGREGATORS: dict[str, Callable[[int], object]] = {
    "upgrad": lambda K: jd_aggregation.UPGrad(),
    "mgda": lambda K: jd_aggregation.MGDA(),
    "imtl_g": lambda K: jd_aggregation.IMTLG(),
    "pcgrad": lambda K: jd_aggregation.PCGrad(),
    "aligned_mtl": lambda K: jd_aggregation.AlignedMTL(),
    "dualproj": lambda K: jd_aggregation.DualProj(),
    "gradvac": lambda K: jd_aggregation.GradVac(),
    "config": lambda K: jd_aggregation.ConFIG(),
    "cagrad": lambda K: jd_aggregation.CAGrad(c=0.4),
    "nash_mtl": lambda K: jd_aggregation.NashMTL(n_tasks=K),
    "fairgrad": lambda K: jd_aggregation.FairGrad(alpha=1.0),
}


# ---------------------------------------------------------------------------------------------
# The model


class MultiTaskMLP(nn.Module):
    def __init__(self, K: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(DIM_IN, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(),
            nn.Linear(WIDTH, WIDTH),
            nn.ReLU(),
        )
        self.heads = nn.ModuleList([nn.Linear(WIDTH, 1) for _ in range(K)])

    def forward(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(x)
        losses = [
            nn.functional.mse_loss(head(z).squeeze(1), y[:, k]) for k, head in enumerate(self.heads)
        ]
        return losses, z


# ---------------------------------------------------------------------------------------------
# Variants: one callable per (method, mode) that runs one full training step


@dataclass
class Variant:
    key: str  # unique label
    group: str  # "base", "loss", "features", "params", "torchjd"
    method: str
    step: Callable[[], None]
    times: list[float] = field(default_factory=list)  # seconds, on the chosen clock
    wall: list[float] = field(default_factory=list)  # wall-clock seconds, always recorded
    error: str | None = None


def _fresh(template: MultiTaskMLP) -> MultiTaskMLP:
    return copy.deepcopy(template)


def make_balancer_step(
    name: str, template: MultiTaskMLP, x: Tensor, y: Tensor, mode: str
) -> Callable[[], None]:
    K = len(template.heads)
    model = _fresh(template)
    cls = tb.method_class(name)
    hparams = dict(method_facts(cls).required_hyperparameters)
    if mode in ("params", REUSE_MODE):
        hparams["params"] = list(model.trunk.parameters())
        hparams["reuse_rows"] = mode == REUSE_MODE
    balancer = tb.create(name, num_tasks=K, **hparams)
    optimizer = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=LR)
    kpis = torch.linspace(0.3, 0.8, K) if cls.requires_kpis else None
    features_mode = mode == "features" and cls.requires_gram

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        stacked = torch.stack(losses)
        kwargs = {}
        if kpis is not None:
            kwargs["kpis"] = kpis
        if features_mode:
            kwargs["features"] = z
        balancer(stacked, **kwargs).backward()
        optimizer.step()

    return step


def make_plain_step(template: MultiTaskMLP, x: Tensor, y: Tensor) -> Callable[[], None]:
    """Σ L_k with no library at all: what ``ew`` costs beyond plain PyTorch."""
    model = _fresh(template)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, _ = model(x, y)
        torch.stack(losses).sum().backward()
        optimizer.step()

    return step


def make_lower_bound_step(
    template: MultiTaskMLP, x: Tensor, y: Tensor, mode: str
) -> Callable[[], None]:
    """The autograd work every G-based method needs, with zero library overhead."""
    model = _fresh(template)
    K = len(model.heads)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trunk_params = list(model.trunk.parameters())
    eye = torch.eye(K)
    w = torch.full((K,), 1.0 / K)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        stacked = torch.stack(losses)
        wrt = [z] if mode == "features" else trunk_params
        jac = torch.autograd.grad(
            stacked, wrt, grad_outputs=eye, is_grads_batched=True, retain_graph=True
        )
        gram = sum(j.reshape(K, -1) @ j.reshape(K, -1).T for j in jac)
        del gram
        (w * stacked).sum().backward()
        optimizer.step()

    return step


def make_loop_lower_bound_step(
    template: MultiTaskMLP, x: Tensor, y: Tensor, mode: str, heads: str = "weighted"
) -> Callable[[], None]:
    """As the lower bound, with K separate ``autograd.grad`` calls on the un-stacked losses.

    ``heads="unweighted"`` (features mode) is the same loop for the methods whose heads keep
    their own gradients, as in their papers' and torchjd's ``mtl_backward``: ``z`` must receive
    ``Jᵀw`` while the heads receive ``Σ ∇L_k``, which costs one pass over the K task-gradient
    rows (``Σ_k (w_k − 1) ∇_z L_k``, handed to ``z`` beside the losses in one backward).
    """
    model = _fresh(template)
    K = len(model.heads)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trunk_params = list(model.trunk.parameters())
    w = torch.full((K,), 1.0 / K)
    if heads == "unweighted" and mode != "features":
        raise ValueError(f"heads='unweighted' is a features-mode reference, got mode={mode!r}")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        wrt = [z] if mode == "features" else trunk_params
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, wrt, retain_graph=True)])
            for loss in losses
        ]
        jac = torch.stack(rows)
        gram = jac @ jac.T
        del gram
        if heads == "unweighted":
            shift = torch.mv(jac.T, w - 1).reshape(z.shape)
            torch.autograd.backward([torch.stack(losses).sum(), z], [None, shift])
        else:
            (w * torch.stack(losses)).sum().backward()
        optimizer.step()

    return step


#: The reference of GradDrop, whose rule does more than ``Jᵀw``: its own paper, by hand.
GRADDROP_BY_HAND = "graddrop_by_hand"


def make_graddrop_by_hand_step(
    template: MultiTaskMLP, x: Tensor, y: Tensor, mode: str
) -> Callable[[], None]:
    """GradDrop (Chen et al. 2020, Algorithm 1) written out in plain torch, with no checks.

    The same rows as the hand-written loop (K ``autograd.grad`` calls), then the paper's rule:
    ``G_k = Σ_batch sign(z)·∇_z L_k`` (features; parameters mode: the task gradient itself),
    ``P = ½(1 + Σ G_k / (Σ |G_k| + 1e-7))`` (LibMTL's epsilon), one uniform per coordinate,
    ``M_k = [P > U][G_k > 0] + [P < U][G_k < 0]`` and ``d = Σ_k M_k ∇L_k`` for the shared
    tensor, the heads keeping ``Σ ∇L_k``. GradDrop's own rows are read against it: what
    GradDrop costs beyond the physical minimum of its rule, which ``Jᵀw`` does not pay.
    """
    model = _fresh(template)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trunk_params = list(model.trunk.parameters())
    generator = torch.Generator().manual_seed(0)
    uniform_dtype = torch.float64 if mode == "features" else torch.float32

    def kept_sum(signed: Tensor, rows: Tensor) -> Tensor:
        """``Σ_k M_k·rows_k``, the masks from ``signed`` [K, C] (rows: [K, C] or [K, S, C])."""
        purity = 0.5 * (1 + signed.sum(0) / (signed.abs().sum(0) + 1e-7))
        # drawn as taskbalance draws it (float64 per feature coordinate, the rows' dtype per
        # parameter entry), so the same seed gives the same masks: the test compares them
        uniform = torch.rand(purity.shape, generator=generator, dtype=uniform_dtype)
        masks = ((purity > uniform) & (signed > 0)) | ((purity < uniform) & (signed < 0))
        if rows.dim() == 3:
            masks = masks.unsqueeze(1)
        return (masks * rows).sum(0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        if mode == "features":
            rows = torch.stack(
                [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
            )
            signed = (torch.sign(z.detach()) * rows).sum(1)
            shift = kept_sum(signed, rows) - rows.sum(0)
            torch.autograd.backward([torch.stack(losses).sum(), z], [None, shift])
        else:
            rows = torch.stack(
                [
                    torch.cat(
                        [
                            g.reshape(-1)
                            for g in torch.autograd.grad(loss, trunk_params, retain_graph=True)
                        ]
                    )
                    for loss in losses
                ]
            )
            shift = kept_sum(rows, rows) - rows.sum(0)
            torch.stack(losses).sum().backward()
            offset = 0
            for param in trunk_params:
                size = param.numel()
                param.grad.add_(shift[offset : offset + size].view_as(param))
                offset += size
        optimizer.step()

    return step


def make_torchjd_step(
    name: str, template: MultiTaskMLP, x: Tensor, y: Tensor
) -> Callable[[], None]:
    model = _fresh(template)
    K = len(model.heads)
    aggregator = TORCHJD_AGGREGATORS[name](K)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    trunk_params = list(model.trunk.parameters())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses, z = model(x, y)
        mtl_backward(losses, features=z)
        jac_to_grad(trunk_params, aggregator)
        optimizer.step()

    return step


# ---------------------------------------------------------------------------------------------
# Measurement


def build_variants(K: int, methods: list[str], modes: list[str], torchjd_methods: list[str]):
    torch.manual_seed(0)
    template = MultiTaskMLP(K)
    x = torch.randn(BATCH, DIM_IN)
    y = torch.randn(BATCH, K)
    variants: list[Variant] = []

    def add(key: str, group: str, method: str, factory: Callable[[], Callable[[], None]]):
        try:
            variants.append(Variant(key, group, method, factory()))
        except Exception as error:  # a method that cannot be built is reported, not fatal
            variants.append(Variant(key, group, method, lambda: None, error=_short(error)))

    def add_reference(key: str, group: str, factory: Callable[[], Callable[[], None]]) -> None:
        add(key, group, key, factory)
        for copy_index in range(2, REFERENCE_COPIES + 1):
            add(f"{key}#{copy_index}", group, key, factory)

    add("plain", "base", "plain", lambda: make_plain_step(template, x, y))
    add_reference("ew", "base", lambda: make_balancer_step("ew", template, x, y, "loss"))
    gradient = [m for m in methods if tb.method_class(m).requires_gram]
    loss_based = [m for m in methods if not tb.method_class(m).requires_gram and m != "ew"]
    for name in loss_based:
        add(name, "loss", name, lambda n=name: make_balancer_step(n, template, x, y, "loss"))
    for mode in modes:
        if gradient and mode == "params":  # the brief's reference: batched, parameters mode
            add_reference(
                f"lower_bound/{mode}",
                "lower_bound",
                lambda m=mode: make_lower_bound_step(template, x, y, m),
            )
        if gradient:
            add_reference(
                f"lower_bound_loop/{mode}",
                "lower_bound",
                lambda m=mode: make_loop_lower_bound_step(template, x, y, m),
            )
        if mode == "features" and any(_unweighted_heads(name) for name in gradient):
            add_reference(
                UNWEIGHTED_LOWER_BOUND,
                "lower_bound",
                lambda: make_loop_lower_bound_step(template, x, y, "features", "unweighted"),
            )
        if "graddrop" in gradient:
            add_reference(
                f"{GRADDROP_BY_HAND}/{mode}",
                "lower_bound",
                lambda m=mode: make_graddrop_by_hand_step(template, x, y, m),
            )
        for name in gradient:
            add(
                f"{name}/{mode}",
                mode,
                name,
                lambda n=name, m=mode: make_balancer_step(n, template, x, y, m),
            )
    if "params" in modes:
        for name in gradient:
            if name in torchjd_methods:
                add(
                    f"torchjd:{name}",
                    "torchjd",
                    name,
                    lambda n=name: make_torchjd_step(n, template, x, y),
                )
                # torchjd's own way: the listed parameters' gradient from the rows
                add(
                    f"{name}/{REUSE_MODE}",
                    REUSE_MODE,
                    name,
                    lambda n=name: make_balancer_step(n, template, x, y, REUSE_MODE),
                )
    return variants


def _unweighted_heads(name: str) -> bool:
    cls = tb.method_class(name)
    return bool(cls.requires_gram) and getattr(cls, "default_heads", "weighted") == "unweighted"


def pooled(variants: list[Variant]) -> dict[str, Variant]:
    """The variants by key, each reference's copies (``key#2``, ...) merged into ``key``."""
    by_key = {v.key: v for v in variants if "#" not in v.key}
    for variant in variants:
        base, copy_mark, _ = variant.key.partition("#")
        if copy_mark:
            reference = by_key[base]
            reference.times.extend(variant.times)
            reference.wall.extend(variant.wall)
            reference.error = reference.error or variant.error
    return by_key


def run_rounds(variants: list[Variant], warmup: int, steps: int, seed: int, clock: str) -> None:
    timer = time.thread_time if clock == "cpu" else time.perf_counter
    order = [v for v in variants if v.error is None]
    rng = random.Random(seed)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(warmup + steps):
            rng.shuffle(order)
            for variant in order:
                if variant.error is not None:
                    continue
                start_wall = time.perf_counter()
                start = timer()
                try:
                    variant.step()
                except Exception as error:
                    variant.error = _short(error)
                    continue
                elapsed = timer() - start
                elapsed_wall = time.perf_counter() - start_wall
                if round_index >= warmup:
                    variant.times.append(elapsed)
                    variant.wall.append(elapsed_wall)
            if round_index % 10 == 9:  # a full collection costs ~0.1 s: not every round
                gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()


def median_ms(variant: Variant | None) -> float:
    if variant is None or variant.error is not None or not variant.times:
        return math.nan
    return 1e3 * statistics.median(variant.times)


def _short(error: Exception) -> str:
    return (
        f"{type(error).__name__}: {str(error).splitlines()[0][:80]}" if str(error) else repr(error)
    )


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt(value: float, target: float | None = None) -> str:
    if math.isnan(value):
        return "–"
    text = f"{value:.2f}"
    if target is not None and value > target:
        text += " ✗"
    return text


def report(results: dict[int, dict[str, Variant]], ks: list[int], methods: list[str], modes):
    out: list[str] = []
    header = "| | " + " | ".join(f"K={K}" for K in ks) + " |"
    rule = "|---" * (len(ks) + 1) + "|"

    def row(label: str, cells: list[str]) -> None:
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    out += ["### Absolute step times (ms, median)", "", header, rule]
    lower_bounds = [
        "lower_bound_loop/features",
        UNWEIGHTED_LOWER_BOUND,
        "lower_bound/params",
        "lower_bound_loop/params",
        f"{GRADDROP_BY_HAND}/features",
        f"{GRADDROP_BY_HAND}/params",
    ]
    for key in ("plain", "ew", *lower_bounds):
        if any(key in results[K] for K in ks):
            row(f"`{key}`", [_fmt(median_ms(results[K].get(key))) for K in ks])
    out.append("")

    def ratio(K: int, key: str, base: str) -> float:
        return median_ms(results[K].get(key)) / median_ms(results[K].get(base))

    loss_based = [m for m in methods if not tb.method_class(m).requires_gram and m != "ew"]
    if loss_based:
        out += [
            "### Loss-based methods: step time / `ew` (target ≤ 1.05, flat in K)",
            "",
            header,
            rule,
        ]
        row("`plain` (no library)", [_fmt(ratio(K, "plain", "ew")) for K in ks])
        for name in loss_based:
            row(f"`{name}`", [_fmt(ratio(K, name, "ew"), 1.05) for K in ks])
        out.append("")

    gradient = [m for m in methods if tb.method_class(m).requires_gram]
    if gradient and "features" in modes:
        out += [
            "### Gradient methods, features mode: step time / hand-written lower bound "
            "(target ≤ 1.15 at every K); in brackets: / `ew`",
            "",
            header,
            rule,
        ]
        row(
            "lower bound (hand-written loop) / `ew`",
            [_fmt(ratio(K, "lower_bound_loop/features", "ew")) for K in ks],
        )
        for name in gradient:
            cells = []
            for K in ks:
                lb = ratio(K, f"{name}/features", "lower_bound_loop/features")
                cells.append(f"{_fmt(lb, 1.15)} ({_fmt(ratio(K, f'{name}/features', 'ew'))})")
            row(f"`{name}`", cells)
        out.append("")
        unweighted = [n for n in gradient if _unweighted_heads(n)]
        if unweighted and any(UNWEIGHTED_LOWER_BOUND in results[K] for K in ks):
            out += [
                '### Methods whose heads keep their own gradients (`heads="unweighted"`), '
                "features mode: step time / hand-written loop with the same heads",
                "",
                header,
                rule,
            ]
            row(
                "same-heads loop / weighted-heads loop",
                [_fmt(ratio(K, UNWEIGHTED_LOWER_BOUND, "lower_bound_loop/features")) for K in ks],
            )
            for name in unweighted:
                row(
                    f"`{name}`",
                    [_fmt(ratio(K, f"{name}/features", UNWEIGHTED_LOWER_BOUND), 1.15) for K in ks],
                )
            out.append("")
    if gradient and "params" in modes:
        out += [
            "### Gradient methods, parameters mode (whole trunk): step time / batched lower "
            "bound (target ≤ 1.1); in brackets: / `ew`",
            "",
            header,
            rule,
        ]
        row("batched lower bound / `ew`", [_fmt(ratio(K, "lower_bound/params", "ew")) for K in ks])
        row(
            "loop lower bound / batched one",
            [_fmt(ratio(K, "lower_bound_loop/params", "lower_bound/params")) for K in ks],
        )
        for name in gradient:
            cells = []
            for K in ks:
                lb = ratio(K, f"{name}/params", "lower_bound/params")
                ew = ratio(K, f"{name}/params", "ew")
                cells.append(f"{_fmt(lb, 1.1)} ({_fmt(ew)})")
            row(f"`{name}`", cells)
        out.append("")
        with_jd = [n for n in gradient if any(f"torchjd:{n}" in results[K] for K in ks)]
        if with_jd:
            version = _torchjd_version()
            out += [
                f"### torchjd {version} `mtl_backward` + `jac_to_grad`, same method: "
                "taskbalance params mode / torchjd (target ≤ 1 at K ≥ 4); in brackets: "
                "torchjd / `ew`",
                "",
                header,
                rule,
            ]
            for name in with_jd:
                for mode, label in (("params", f"`{name}`"), (REUSE_MODE, "`reuse_rows=True`")):
                    cells = []
                    for K in ks:
                        ours = ratio(K, f"{name}/{mode}", f"torchjd:{name}")
                        theirs = ratio(K, f"torchjd:{name}", "ew")
                        cells.append(f"{_fmt(ours, 1.0 if K >= 4 else None)} ({_fmt(theirs)})")
                    row(label, cells)
            out.append("")
    by_hand_modes = [m for m in modes if any(f"{GRADDROP_BY_HAND}/{m}" in results[K] for K in ks)]
    if by_hand_modes:
        out += [
            "### GradDrop, whose rule does more than `Jᵀw`: step time / the paper's rule written "
            "by hand in plain torch (same rows, no checks); in brackets: the hand-written rule "
            "/ the reference the tables above divide by in that mode (features: the same-heads "
            "loop; parameters: the batched lower bound)",
            "",
            header,
            rule,
        ]
        for mode in by_hand_modes:
            reference = UNWEIGHTED_LOWER_BOUND if mode == "features" else "lower_bound/params"
            cells = []
            for K in ks:
                ours = ratio(K, f"graddrop/{mode}", f"{GRADDROP_BY_HAND}/{mode}")
                by_hand = ratio(K, f"{GRADDROP_BY_HAND}/{mode}", reference)
                cells.append(f"{_fmt(ours, 1.1)} ({_fmt(by_hand)})")
            row(f"`graddrop`, {mode} mode", cells)
        out.append("")
    errors = sorted(
        {(v.key, v.error) for K in ks for v in results[K].values() if v.error is not None}
    )
    if errors:
        out += ["Variants that could not run:", ""]
        out += [f"- `{key}`: {error}" for key, error in errors]
        out.append("")
    return "\n".join(out)


def _torchjd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torchjd")
    except PackageNotFoundError:
        return "?"


def write_csv(path: Path, results: dict[int, dict[str, Variant]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "K",
                "variant",
                "group",
                "method",
                "median_ms",
                "wall_median_ms",
                "n",
                "ratio_ew",
                "error",
            ]
        )
        for K, variants in results.items():
            ew = median_ms(variants.get("ew"))
            for v in variants.values():
                ms = median_ms(v)
                wall = 1e3 * statistics.median(v.wall) if v.wall else math.nan
                writer.writerow(
                    [
                        K,
                        v.key,
                        v.group,
                        v.method,
                        f"{ms:.4f}",
                        f"{wall:.4f}",
                        len(v.times),
                        f"{ms / ew:.4f}",
                        v.error or "",
                    ]
                )


# ---------------------------------------------------------------------------------------------
# Engine micro-benchmark: batched vs looped Jacobian rows per mode


def engine_table(ks: list[int], steps: int, clock: str) -> str:
    from taskbalance._gramian import task_gradients

    timer = time.thread_time if clock == "cpu" else time.perf_counter
    lines = [
        "### Engine: `task_gradients` (the rows a balancer takes) batched vs loop (ms, median; "
        "graph built once per K)",
        "",
        "| K | features batched | features loop | features edges | params batched "
        "| params loop | params edges |",
        "|---|---|---|---|---|---|---|",
    ]
    for K in ks:
        torch.manual_seed(0)
        model = MultiTaskMLP(K)
        x, y = torch.randn(BATCH, DIM_IN), torch.randn(BATCH, K)
        losses, z = model(x, y)
        stacked = torch.stack(losses)
        params = list(model.trunk.parameters())
        # `vector` has the same values as `stacked` but is not a stack: the engine cannot see
        # the per-task edges and loops over vector[k] (each backward runs all K heads).
        vector = stacked * 1.0
        cases = {
            ("features", "batched"): lambda s=stacked, z=z: task_gradients(s, [z], batched=True),
            ("features", "loop"): lambda v=vector, z=z: task_gradients(v, [z], batched=False),
            ("features", "edges"): lambda s=stacked, z=z: task_gradients(s, [z], batched=False),
            ("params", "batched"): lambda s=stacked, p=params: task_gradients(s, p, batched=True),
            ("params", "loop"): lambda v=vector, p=params: task_gradients(v, p, batched=False),
            ("params", "edges"): lambda s=stacked, p=params: task_gradients(s, p, batched=False),
        }
        times: dict = {key: [] for key in cases}
        keys = list(cases)
        for index in range(steps + 3):
            random.Random(index).shuffle(keys)
            for key in keys:
                start = timer()
                cases[key]()
                if index >= 3:
                    times[key].append(timer() - start)
        cells = [f"{1e3 * statistics.median(times[key]):.2f}" for key in cases]
        lines.append(f"| {K} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="2,4,16,40", help="comma-separated K values")
    parser.add_argument(
        "--methods",
        default="all",
        help="comma-separated registry names (default: every registered method)",
    )
    parser.add_argument("--modes", default="features,params", help="features and/or params")
    parser.add_argument("--steps", type=int, default=50, help="timed rounds per K (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds per K first")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: least noise)"
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: this thread's CPU time (robust to other processes on a shared machine; "
        "needs --threads 1); wall: perf_counter",
    )
    parser.add_argument(
        "--torchjd",
        default="upgrad,mgda",
        help="methods to compare with torchjd (parameters mode), 'all' or 'none' "
        "(default: upgrad,mgda, the two our targets name; 'all' adds ~1.5 min)",
    )
    parser.add_argument("--engine", action="store_true", help="also time batched vs loop rows")
    parser.add_argument("--csv", type=Path, default=None, help="also write raw medians here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the round-robin order")
    parser.add_argument("--width", type=int, default=WIDTH, help=f"trunk width (default {WIDTH})")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    args = parser.parse_args(argv)
    # The model's size is read by every step factory: set once, before any is built.
    globals().update(WIDTH=args.width, BATCH=args.batch)

    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread: use --threads 1 or --clock wall")
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in _csv_list(args.ks)]
    modes = _csv_list(args.modes)
    for mode in modes:
        if mode not in ("features", "params"):
            parser.error(f"--modes: expected features and/or params, got {mode!r}")
    methods = tb.available() if args.methods == "all" else _csv_list(args.methods)
    for name in methods:
        tb.method_class(name)  # a clear error for an unknown name
    if "ew" not in methods:
        methods = ["ew", *methods]
    if torchjd is None or args.torchjd == "none":
        torchjd_methods: list[str] = []
    elif args.torchjd == "all":
        torchjd_methods = list(TORCHJD_AGGREGATORS)
    else:
        torchjd_methods = _csv_list(args.torchjd)
        unknown = sorted(set(torchjd_methods) - set(TORCHJD_AGGREGATORS))
        if unknown:
            parser.error(f"--torchjd: no torchjd counterpart for {unknown}")

    started = time.perf_counter()
    results: dict[int, dict[str, Variant]] = {}
    for K in ks:
        variants = build_variants(K, methods, modes, torchjd_methods)
        run_rounds(variants, args.warmup, args.steps, args.seed + K, args.clock)
        results[K] = pooled(variants)
        print(
            f"[K={K}: {len(variants)} variants, {time.perf_counter() - started:.0f} s]",
            file=sys.stderr,
            flush=True,
        )

    print(
        f"## Step-time overhead — torch {torch.__version__}, {args.threads} thread(s), "
        f"MLP {DIM_IN}→3×{WIDTH} ReLU, batch {BATCH}, K linear heads + MSE, "
        f"median of {args.steps} rounds after {args.warmup} warm-up, round-robin, "
        f"{'thread CPU time' if args.clock == 'cpu' else 'wall-clock time'}\n"
    )
    print(report(results, ks, methods, modes))
    if args.engine:
        print(engine_table(ks, max(10, args.steps // 2), args.clock))
    if args.csv is not None:
        write_csv(args.csv, results)
    print(f"_total wall time {time.perf_counter() - started:.0f} s_", file=sys.stderr)


if __name__ == "__main__":
    main()
