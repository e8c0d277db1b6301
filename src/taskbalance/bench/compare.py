"""A comparison: every method and the single-task baselines over seeds, parallel and resumable.

:func:`run_comparison` is what ``taskbalance compare`` calls, usable from Python. Each
(method, seed) run and each single-task model is an independent job; with ``jobs > 1`` they
run in that many worker processes (spawned, each with ``threads // jobs`` torch threads, at
least one), and since a run is a function of its settings and seed, every run's numbers are
the same as with ``jobs = 1`` at the same thread count per run. Each finished run is written
at once to ``OUT/runs/<run>.json`` together with the settings it ran under; a rerun with the
same settings loads those instead of training again (``fresh=True`` starts over).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

import taskbalance
from taskbalance.bench.api import Benchmark, benchmark_code_files, load_benchmark
from taskbalance.bench.harness import (
    Method,
    ProgressBar,
    RunResult,
    TrainConfig,
    _plain,
    check_method,
    train_run,
)
from taskbalance.bench.metrics import MethodSummary, summarise
from taskbalance.bench.report import benchmark_metadata, training_metadata
from taskbalance.bench.selection import Selection, check_selection

RUNS_DIRECTORY = "runs"


@dataclass(frozen=True)
class BenchmarkSource:
    """How to build the benchmark again in a worker process.

    Args:
        spec: registered name, ``file.py:function`` or ``module:function``.
        small: small splits.
        data_seed: data seed.
        data_root: the user's data directory, or None.
        model: which of the benchmark's models (``--model``), or None for its default.
    """

    spec: str
    small: bool = False
    data_seed: int = 0
    data_root: str | None = None
    model: str | None = None

    def build(self) -> Benchmark:
        """The benchmark."""
        return load_benchmark(
            self.spec,
            small=self.small,
            data_seed=self.data_seed,
            data_root=self.data_root,
            model=self.model,
        )


@dataclass(frozen=True)
class Job:
    """One run of a comparison.

    Args:
        method: the method, or None for a single-task model.
        single_task: the task of a single-task model.
        seed: the training seed.
    """

    method: Method | None
    single_task: int | None
    seed: int

    def label(self, benchmark: Benchmark) -> str:
        """``method`` or ``single-task[task]``, for progress lines."""
        if self.method is not None:
            return self.method.label
        return f"single-task[{benchmark.tasks[self.single_task or 0].name}]"


@dataclass
class Comparison:
    """What :func:`run_comparison` produced.

    Args:
        benchmark: the benchmark.
        runs: every finished run (loaded or trained), in job order.
        rows: the summary rows.
        resumed: runs loaded from an earlier invocation.
        interrupted: True when Ctrl-C stopped it.
        seconds: wall time.
    """

    benchmark: Benchmark
    runs: list[RunResult]
    rows: list[MethodSummary]
    resumed: int = 0
    interrupted: bool = False
    seconds: float = 0.0


def plan_jobs(
    benchmark: Benchmark, methods: Sequence[Method], seeds: Sequence[int], single_task: bool = True
) -> list[Job]:
    """Single-task models first (each seed, each task), then each method over seeds."""
    jobs = []
    if single_task:
        jobs += [Job(None, k, seed) for seed in seeds for k in range(benchmark.num_tasks)]
    jobs += [Job(method, None, seed) for method in methods for seed in seeds]
    return jobs


def _run_key(
    source: BenchmarkSource,
    job: Job,
    config: TrainConfig,
    model: str | None = None,
    content: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # The model that ran (settings["model"] of a benchmark that offers several) is part of the
    # key, so a run of one default model is never resumed as the other's, and the default
    # and the same model named by --model share their runs. ``content`` is what the
    # benchmark's own code fixes (see _benchmark_content): the command line alone would
    # resume stale runs after an edit of the user's benchmark file.
    source_fields = {key: value for key, value in vars(source).items() if key != "model"}
    key = {
        "benchmark": _plain(source_fields),
        "method": None if job.method is None else job.method.label,
        "hyperparameters": None if job.method is None else _plain(job.method.hyperparameters),
        "single_task": job.single_task,
        "seed": job.seed,
        "config": _plain({**vars(config), "seed": job.seed}),
    }
    if model is not None:
        key["model"] = model
    if content is not None:
        key["content"] = content
    return key


def _benchmark_content(
    benchmark: Benchmark, config: TrainConfig, source: BenchmarkSource
) -> dict[str, Any]:
    """What a run's result depends on beyond the command line: the data's settings and split
    sizes, the tasks and their metrics, the model's architecture and the resolved training
    settings (the benchmark's defaults under the command line's overrides), as
    ``metadata.json`` pins them; the description is left out, it changes no result.

    Also the code: the SHA-256 of each source file a run executes (see
    :func:`~taskbalance.bench.api.benchmark_code_files`: the file the spec names, and the files
    defining the factory, the model's modules, the data sets, the losses, KPIs and metrics,
    wherever they were imported from) and the library's version. The metadata names a loss or
    a forward pass but does not see an edit of its body (a loss scaled by 2 keeps its name),
    which would otherwise resume the old runs. Code those files reach only through other
    modules (a helper function a loss calls) is not seen: ``--fresh`` retrains.
    """
    model = benchmark.build_model()
    content = benchmark_metadata(benchmark, model)
    content["benchmark"].pop("description")
    content["training"] = training_metadata(benchmark, config)
    # The digests alone, sorted: the key stays the same wherever the files are checked out.
    digests = sorted(
        {
            hashlib.sha256(path.read_bytes()).hexdigest()
            for path in benchmark_code_files(source.spec, benchmark, model)
        }
    )
    content["code"] = {"taskbalance": taskbalance.__version__, "source_sha256": digests}
    return content


def run_file(out: Path, benchmark: Benchmark, job: Job) -> Path:
    """``OUT/runs/<label>-seed<k>.json`` with the label made file-safe."""
    label = re.sub(r"[^A-Za-z0-9_.=-]+", "_", job.label(benchmark))
    return out / RUNS_DIRECTORY / f"{label}-seed{job.seed}.json"


def _load_finished(path: Path, key: dict[str, Any]) -> RunResult | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    # Compared as JSON text: a NaN setting is equal to itself there, never as a float
    if json.dumps(stored.get("key"), sort_keys=True) != json.dumps(key, sort_keys=True):
        return None
    run = RunResult.from_dict(stored["result"])
    return run if not run.interrupted else None


def _save(path: Path, key: dict[str, Any], run: RunResult) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"key": key, "result": run.to_dict()}))
    temporary.replace(path)


_WORKER_BENCHMARKS: dict[BenchmarkSource, Benchmark] = {}


def _worker_setup(threads: int) -> None:
    torch.set_num_threads(threads)


def _worker_run(source: BenchmarkSource, job: Job, config: TrainConfig) -> dict[str, Any]:
    benchmark = _WORKER_BENCHMARKS.get(source)
    if benchmark is None:
        benchmark = _WORKER_BENCHMARKS[source] = source.build()
    run = train_run(
        benchmark,
        job.method,
        single_task=job.single_task,
        config=TrainConfig(**{**vars(config), "seed": job.seed}),
    )
    return run.to_dict()


def run_comparison(
    source: BenchmarkSource,
    methods: Sequence[Method],
    *,
    seeds: Sequence[int],
    out: Path,
    config: TrainConfig | None = None,
    selection: Selection | None = None,
    jobs: int = 1,
    threads: int = 1,
    fresh: bool = False,
    benchmark: Benchmark | None = None,
    progress: ProgressBar | None = None,
    log: Callable[[str], None] | None = None,
) -> Comparison:
    """Train (or load) every run of a comparison and summarise it.

    Args:
        source: how to build the benchmark (again, in each worker).
        methods: the methods and variants; the single-task models are added.
        seeds: the training seeds.
        out: the output directory (per-run results go to ``out/runs``).
        config: overrides of the benchmark's training defaults (the seed is ignored).
        selection: the model-selection rule.
        jobs: worker processes (1: in this process).
        threads: torch threads in all: with ``jobs = 1`` the runs use them all, otherwise each
            worker gets ``max(1, threads // jobs)``. A run's results are bit-identical across
            ``jobs`` when it gets the same number of threads (the thread count changes the
            order of float reductions).
        fresh: delete earlier per-run results instead of resuming from them.
        benchmark: the already built benchmark (else built from ``source``).
        progress: advanced per step with ``jobs = 1``, per run otherwise.
        log: called with one line per finished run.

    Returns:
        The comparison (summary rows, runs, what was resumed, whether it was interrupted).

    Raises:
        ValueError: a method that cannot be created for this benchmark, or a selection rule its
            metrics cannot be judged by (before training).
    """
    started = time.perf_counter()
    benchmark = benchmark or source.build()
    config = config or TrainConfig()
    selection = selection or Selection()
    check_selection(selection, benchmark.directions)
    for method in methods:
        check_method(method, benchmark)
    runs_directory = out / RUNS_DIRECTORY
    if fresh and runs_directory.exists():
        shutil.rmtree(runs_directory)
    runs_directory.mkdir(parents=True, exist_ok=True)

    planned = plan_jobs(benchmark, methods, seeds)
    results: dict[int, RunResult] = {}
    pending: list[int] = []
    model = benchmark.settings.get("model")
    model_name = model if isinstance(model, str) else None
    content = _benchmark_content(benchmark, config, source)
    keys = [_run_key(source, job, config, model_name, content) for job in planned]
    for index, job in enumerate(planned):
        found = _load_finished(run_file(out, benchmark, job), keys[index])
        if found is not None:
            results[index] = found
        else:
            pending.append(index)
    resumed = len(results)
    if resumed and log is not None:
        log(f"resuming: {resumed} finished run(s) loaded from {runs_directory}")

    def finish(index: int, run: RunResult) -> None:
        results[index] = run
        if not run.interrupted:
            _save(run_file(out, benchmark, planned[index]), keys[index], run)
        if log is not None:
            status = f" ({run.failure})" if run.failure else ""
            job = planned[index]
            log(
                f"[{len(results)}/{len(planned)}] {job.label(benchmark)} seed {job.seed}: "
                f"{run.seconds_per_epoch:.3f} s/epoch{status}"
            )

    interrupted = False
    # The serial path runs with the same thread count as each parallel worker would: the
    # number of intra-op threads changes the order of float reductions, and so the results.
    caller_threads = torch.get_num_threads()
    try:
        if jobs <= 1:
            torch.set_num_threads(max(1, threads))
            for index in pending:
                job = planned[index]
                if progress is not None:
                    progress.set_postfix_str(f"{job.label(benchmark)} seed {job.seed}")
                run = train_run(
                    benchmark,
                    job.method,
                    single_task=job.single_task,
                    config=TrainConfig(**{**vars(config), "seed": job.seed}),
                    progress=progress,
                )
                if run.interrupted:
                    interrupted = True
                    break
                finish(index, run)
        else:
            interrupted = _run_parallel(
                source, planned, pending, config, jobs, threads, finish, progress
            )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        torch.set_num_threads(caller_threads)
    runs = [results[index] for index in sorted(results)]
    rows = summarise(runs, benchmark, selection)
    return Comparison(
        benchmark=benchmark,
        runs=runs,
        rows=rows,
        resumed=resumed,
        interrupted=interrupted,
        seconds=time.perf_counter() - started,
    )


def _run_parallel(
    source: BenchmarkSource,
    planned: Sequence[Job],
    pending: Sequence[int],
    config: TrainConfig,
    jobs: int,
    threads: int,
    finish: Callable[[int, RunResult], None],
    progress: ProgressBar | None,
) -> bool:
    """Run the pending jobs in ``jobs`` spawned processes; True when interrupted."""
    per_worker = max(1, threads // jobs)
    executor = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=get_context("spawn"),
        initializer=_worker_setup,
        initargs=(per_worker,),
    )
    futures: dict[Future[dict[str, Any]], int] = {}
    try:
        for index in pending:
            job = planned[index]
            futures[executor.submit(_worker_run, source, job, config)] = index
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in done:
                finish(futures[future], RunResult.from_dict(future.result()))
                if progress is not None:
                    progress.update(1)
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()
        executor.shutdown(wait=False, cancel_futures=True)
        return True
    executor.shutdown(wait=True)
    return False
