"""Model-selection rules: which epoch's test metrics a run reports.

Papers differ here and tables fail to reproduce over exactly this, so every table states its
rule:

- ``last``: the test metrics after the last epoch.
- ``best-val``: the test metrics of the epoch whose validation metrics have the lowest Δm%
  against a reference (the single-task models' last-epoch validation metrics, mean over seeds;
  a run without that reference uses its own first epoch). A single-task model is judged on its
  own task's metrics only. Metrics whose reference is 0 or NaN are left out of this score (it
  divides by the reference), so a zero baseline changes which epoch is picked but cannot stop
  the selection; the Δm% reported for the table is then NaN (see
  :mod:`taskbalance.bench.metrics`).
- ``best-val-mean``: the test metrics of the epoch whose validation metrics have the best
  plain mean (FAMO's CelebA rule, Liu et al. 2023: the highest mean validation F1; the first
  such epoch at a tie, as its ``>``), highest where every metric is higher-is-better, lowest
  where every one is lower-is-better; a benchmark that mixes the two directions is refused
  (a plain mean of them means nothing: use ``best-val``). A single-task model is judged on
  its own task's metrics; an epoch whose mean is NaN is passed over.
- ``mean-last-K`` (e.g. ``mean-last-3``; ``mean-last-k`` means 3): the mean of the test
  metrics over the last K epochs (as several papers average the last epochs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from taskbalance.bench.harness import RunResult

DEFAULT_LAST_K = 3


@dataclass(frozen=True)
class Selection:
    """A model-selection rule.

    Args:
        rule: ``"last"``, ``"best-val"``, ``"best-val-mean"`` or ``"mean-last"``.
        k: epochs averaged by ``"mean-last"``.
    """

    rule: str = "last"
    k: int = DEFAULT_LAST_K

    def __str__(self) -> str:
        return f"mean-last-{self.k}" if self.rule == "mean-last" else self.rule

    def describe(self) -> str:
        """One sentence for the table's header."""
        if self.rule == "best-val":
            return "test metrics at the epoch with the best validation Δm%"
        if self.rule == "best-val-mean":
            return "test metrics at the epoch with the best mean validation metric"
        if self.rule == "mean-last":
            return f"test metrics averaged over the last {counted(self.k, 'epoch')}"
        return "test metrics after the last epoch"


def parse_selection(text: str) -> Selection:
    """``last``, ``best-val``, ``best-val-mean``, ``mean-last-K`` or ``mean-last-k``.

    Raises:
        ValueError: anything else.
    """
    text = text.strip()
    if text in ("last", "best-val", "best-val-mean"):
        return Selection(text)
    match = re.fullmatch(r"mean-last-(\d+|k)", text)
    if match:
        k = DEFAULT_LAST_K if match.group(1) == "k" else int(match.group(1))
        if k >= 1:
            return Selection("mean-last", k)
    raise ValueError(
        f"--select: expected last, best-val, best-val-mean or mean-last-K (K >= 1), got {text!r}"
    )


def _relative_score(
    values: Sequence[float], reference: Sequence[float], directions: Sequence[bool], used: slice
) -> float:
    total, count = 0.0, 0
    for value, base, higher in zip(values[used], reference[used], directions[used], strict=True):
        if base == 0 or math.isnan(base) or math.isnan(value):
            continue
        total += (-1.0 if higher else 1.0) * (value - base) / abs(base)
        count += 1
    return total / count if count else math.nan


def selected_test(
    run: RunResult,
    selection: Selection,
    directions: Sequence[bool],
    reference: Sequence[float] | None = None,
    used: slice | None = None,
) -> list[float]:
    """The test metrics a run reports under ``selection``.

    Args:
        run: the run.
        selection: the rule.
        directions: ``higher_is_better`` of each metric number.
        reference: validation reference for ``best-val`` (see the module docstring).
        used: which metric numbers judge the validation score (a single-task model's own).

    Returns:
        One value per metric number; NaN when the run failed or has no epoch.
    """
    if run.failure is not None or not run.epochs:
        return [math.nan] * len(run.metric_names)
    if selection.rule == "mean-last":
        chosen = run.epochs[-selection.k :]
        return [
            math.fsum(record.test[i] for record in chosen) / len(chosen)
            for i in range(len(run.metric_names))
        ]
    if selection.rule == "best-val-mean":
        part = used or slice(None)
        sign = -1.0 if _common_direction(directions[part]) else 1.0
        return _test_of_lowest(run, [sign * _mean(epoch.validation[part]) for epoch in run.epochs])
    if selection.rule == "best-val":
        base = list(reference) if reference is not None else run.epochs[0].validation
        part = used or slice(None)
        return _test_of_lowest(
            run, [_relative_score(epoch.validation, base, directions, part) for epoch in run.epochs]
        )
    return list(run.epochs[-1].test)


def _test_of_lowest(run: RunResult, scores: Sequence[float]) -> list[float]:
    """The test metrics of the epoch with the lowest score: the first at a tie, NaN scores
    passed over, the last epoch when every score is NaN."""
    finite = [(score, index) for index, score in enumerate(scores) if not math.isnan(score)]
    best = min(finite)[1] if finite else len(run.epochs) - 1
    return list(run.epochs[best].test)


def check_selection(selection: Selection, directions: Sequence[bool]) -> None:
    """Refuse, before any training, a rule the benchmark's metrics cannot be judged by.

    Raises:
        ValueError: ``best-val-mean`` on metrics of both directions.
    """
    if selection.rule == "best-val-mean":
        _common_direction(directions)


def _common_direction(directions: Sequence[bool]) -> bool:
    """Whether every metric is higher-is-better (False: every one lower-is-better)."""
    if all(directions):
        return True
    if not any(directions):
        return False
    raise ValueError(
        "--select best-val-mean: the mean of metrics some of which are better higher and some "
        f"lower means nothing (directions, higher-is-better: {list(directions)}); use best-val, "
        "which scores each metric's relative change in its own direction"
    )


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def counted(number: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``: captions and console lines."""
    return f"{number} {noun}{'' if number == 1 else 's'}"
