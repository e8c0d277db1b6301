"""How often a 2-rank gloo DDP job dies at exit, by how its ranks end (docs/recipes/ddp.md).

torch 2.13: each gloo work copies the issuing thread's ``at::ThreadLocalState``, which during a
backward holds a Python object (the ``contextvars.Context`` autograd stashes there). DDP's
gradient all-reduces are issued in the backward, and gloo's worker thread frees each once it
completes: that needs the GIL. When the main thread still holds the GIL at that point and
goes on to tear the process group down (joining that worker) the rank hangs; when it goes on
to finalize the interpreter, the worker is ended inside a destructor and the rank aborts with
``terminate called without an active exception``.

Each run spawns two CPU ranks that train a tiny DDP model a few steps (plain DDP, or with a
balancer called each step) and end as ``--ending`` says; the script counts the runs that
aborted or hung::

    OMP_NUM_THREADS=1 python scripts/ddp_teardown.py --runs 30 --ending return
    OMP_NUM_THREADS=1 python scripts/ddp_teardown.py --runs 30 --ending return --balancer mgda
    OMP_NUM_THREADS=1 python scripts/ddp_teardown.py --runs 20 --ending return --no-stash

``--no-stash`` turns torch's stash into a no-op in the ranks (``torch._C._stash_obj_in_tls``):
the control that names the Python object.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENDINGS = {
    "return": "the training function returns; the interpreter exits",
    "destroy": "dist.destroy_process_group(), then return",
    "barrier_destroy": "dist.barrier(), dist.destroy_process_group(), then return",
    "exit": "os._exit(0) once the results are saved (the examples' end_rank)",
}


def train_rank(rank: int, ending: str, balancer_name: str, no_stash: bool, store: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    if no_stash:
        torch._C._stash_obj_in_tls = lambda key, value: None
        torch._C._remove_obj_from_tls = lambda key: None
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
            self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(2)])

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            z = self.trunk(x)
            return z, torch.cat([head(z) for head in self.heads], dim=1)

    model = nn.parallel.DistributedDataParallel(Model())
    balancer = None
    if balancer_name:
        import taskbalance as tb

        balancer = tb.create(balancer_name, num_tasks=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(100 * step + rank))
        z, outputs = model(x)
        losses = ((outputs - x[:, :2]) ** 2).mean(dim=0)
        optimizer.zero_grad()
        objective = losses.sum() if balancer is None else balancer(losses, features=z)
        objective.backward()
        optimizer.step()
    if ending == "barrier_destroy":
        dist.barrier()
    if ending in ("destroy", "barrier_destroy"):
        dist.destroy_process_group()
    if ending == "exit":
        os._exit(0)


def one_run(arguments: argparse.Namespace) -> None:
    """The job itself: two spawned ranks (this script re-run with --one-run)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        store = str(Path(folder) / "store")
        options = (arguments.ending, arguments.balancer, arguments.no_stash, store)
        mp.spawn(train_rank, args=options, nprocs=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--ending", choices=sorted(ENDINGS), default="return")
    parser.add_argument("--balancer", default="", help="a method name; default: plain DDP")
    parser.add_argument("--no-stash", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a hang")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one_run:
        one_run(arguments)
        return
    command = [sys.executable, __file__, "--one-run", "--ending", arguments.ending]
    command += ["--balancer", arguments.balancer] + ["--no-stash"] * arguments.no_stash
    aborted = hung = 0
    started = time.monotonic()
    for run in range(arguments.runs):
        job = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, _ = job.communicate(timeout=arguments.timeout)
        except subprocess.TimeoutExpired:
            hung += 1
            print(f"run {run}: hung (py-spy dump --pid on its ranks shows where)")
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
            continue
        if job.returncode != 0:
            aborted += 1
            last = output.decode(errors="replace").strip().splitlines()[-1:]
            print(f"run {run}: exit status {job.returncode}: {last}")
    what = f"balancer {arguments.balancer}" if arguments.balancer else "plain DDP"
    stash = ", backward's stash disabled" if arguments.no_stash else ""
    print(
        f"{what}{stash}, ending '{arguments.ending}' ({ENDINGS[arguments.ending]}): "
        f"{arguments.runs} runs, {aborted} failed, {hung} hung "
        f"({time.monotonic() - started:.0f} s)"
    )


if __name__ == "__main__":
    main()
