"""A balancer in a PyTorch Lightning module: automatic optimisation, DDP, logging, resume.

The balancer is an ``nn.Module`` attribute of the ``LightningModule``, so Lightning moves it to
the device, wraps it with the model under DDP and saves its state (buffers, learned log-scales,
generators) in every checkpoint; its learned parameters, if any, go into
``configure_optimizers`` in their own parameter group. ``training_step`` returns the balancer's
objective and Lightning's automatic optimisation does the one ordinary backward.

Use ``strategy="ddp"`` (Lightning's default for several devices: it starts the other ranks by
re-running the script). ``"ddp_spawn"`` pickles the module into the new processes, and torch
cannot yet send a ``torch.Generator`` that way (pytorch/pytorch#146828): it fails for the
methods that own one (``rlw``, ``pcgrad``, ``gradvac``, ...).

Needs ``pip install pytorch-lightning`` (2.4 or later; not a dependency of taskbalance).

Run as a script, it checks what a user relies on, on two CPU processes (DDP, gloo):
training two epochs in one go and training one epoch, stopping, and resuming from the
Lightning checkpoint for the second give the same balancer state, bit for bit, and the same
model; the weights are logged every step::

    python examples/lightning_module.py                    # famo, gradvac and uw
    python examples/lightning_module.py --methods mgda     # any registered method
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import taskbalance as tb

#: The learned log-scales of ``uw``/``imtl_l`` train with this multiple of the model's learning
#: rate (and Adam betas (0.9, 0.9)), as the bundled benchmarks do: in the model's group their
#: first, very large gradients stall them for thousands of steps.
BALANCER_LR_FACTOR = 10.0


# --8<-- [start:module]
class MultiTaskModule(pl.LightningModule):
    """A shared trunk, a classification head and a regression head, balanced by ``method``."""

    def __init__(self, method: str = "famo", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = lr
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
        self.classify = nn.Linear(16, 3)
        self.regress = nn.Linear(16, 1)
        # An attribute like any layer: checkpointed, moved to the device, seen by DDP.
        self.balancer = tb.create(method, num_tasks=2)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, label, target = batch
        z = self.trunk(x)
        losses = torch.stack(
            [
                nn.functional.cross_entropy(self.classify(z), label),
                nn.functional.mse_loss(self.regress(z).squeeze(1), target),
            ]
        )
        # features=z is read by gradient methods and ignored by the others.
        objective = self.balancer(losses, features=z)
        weights = self.balancer.weights
        self.log_dict(
            {
                **{f"balancer/weight/{k}": weights[k] for k in range(len(weights))},
                **{f"balancer/loss/{k}": losses[k].detach() for k in range(len(losses))},
            },
            on_step=True,
            on_epoch=False,
        )
        return objective  # automatic optimisation: Lightning calls backward and step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        model = [p for name, p in self.named_parameters() if not name.startswith("balancer.")]
        groups: list[dict[str, Any]] = [{"params": model, "lr": self.lr}]
        learned = list(self.balancer.parameters())  # empty except for uw and imtl_l
        if learned:
            groups.append(
                {
                    "params": learned,
                    "lr": BALANCER_LR_FACTOR * self.lr,
                    "betas": (0.9, 0.9),
                }
            )
        return torch.optim.Adam(groups)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # With Trainer(accumulate_grad_batches=N) and accumulation_steps=N, Lightning also
        # steps on an epoch's last, shorter window: the balancer's next window starts afresh.
        self.balancer.end_window()

    def on_train_epoch_end(self) -> None:
        # DWA's per-epoch rates and STCH's warm-up count epochs; a no-op for other methods.
        self.balancer.end_epoch()


# --8<-- [end:module]


def make_data(n: int = 512) -> TensorDataset:
    """A classification and a regression in large raw units from the same 8 inputs."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=generator)
    label = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    target = 50.0 * x[:, 2] - 20.0 * x[:, 3] + torch.randn(n, generator=generator)
    return TensorDataset(x, label, target)


# --8<-- [start:fit]
def fit(method: str, epochs: int, root: Path, resume: Path | None = None) -> MultiTaskModule:
    """Train on 2 CPU processes (DDP over gloo); returns the trained module."""
    pl.seed_everything(0, workers=True, verbose=False)
    module = MultiTaskModule(method)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=epochs,
        logger=CSVLogger(root, name="logs"),
        log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = DataLoader(make_data(), batch_size=32, shuffle=True)
    trainer.fit(module, loader, ckpt_path=resume)
    return module


# --8<-- [end:fit]


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal keys and bit-for-bit equal values (tensors compared exactly)."""
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif isinstance(x, dict):
            if not (isinstance(y, dict) and same_tensors(x, y)):
                return False
        elif x != y:
            return False
    return True


def logged_weight_rows(root: Path) -> int:
    """Rows of the CSV log that carry the balancer's weights."""
    rows = 0
    for path in root.glob("logs/*/metrics.csv"):
        with path.open() as handle:
            rows += sum(1 for row in csv.DictReader(handle) if row.get("balancer/weight/0"))
    return rows


def check(method: str, workdir: Path) -> bool:
    straight = fit(method, epochs=2, root=workdir / method / "straight")
    first = fit(method, epochs=1, root=workdir / method / "interrupted")
    last = workdir / method / "interrupted" / "checkpoints" / "last.ckpt"
    resumed = fit(method, epochs=2, root=workdir / method / "resumed", resume=last)
    balancer_same = same_tensors(straight.balancer.state_dict(), resumed.balancer.state_dict())
    model_same = same_tensors(straight.state_dict(), resumed.state_dict())
    steps = int(straight.balancer.num_steps)
    halfway = int(first.balancer.num_steps)
    logged = logged_weight_rows(workdir / method / "straight")
    # The resumed run trains epoch 2 only: the checkpoint, not a second run from scratch,
    # brought it to the same state.
    trained_after_resume = logged_weight_rows(workdir / method / "resumed")
    if straight.global_rank == 0:  # every rank runs this script; rank 0 reports
        print(f"{method}: trained on {straight.trainer.world_size} processes (DDP)")
        print(f"{method}: balancer steps {halfway} after epoch 1, {steps} after epoch 2")
        print(f"{method}: resumed balancer state equals the uninterrupted run's: {balancer_same}")
        print(f"{method}: resumed model equals the uninterrupted run's: {model_same}")
        print(f"{method}: weights logged at {logged} of {steps} steps")
        print(f"{method}: steps trained after resuming: {trained_after_resume}")
        weights = [round(w, 4) for w in straight.balancer.weights.tolist()]
        print(f"{method}: final weights {weights}")
    return (
        balancer_same
        and model_same
        and steps == 2 * halfway > 0
        and logged == steps
        and trained_after_resume == steps - halfway
    )


#: Lightning's "ddp" re-runs this script for rank 1 with rank 0's environment: the scratch
#: directory travels in it, so both ranks read and write the same checkpoints.
WORKDIR_VARIABLE = "TASKBALANCE_LIGHTNING_EXAMPLE_DIR"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="famo,gradvac,uw")
    arguments = parser.parse_args()
    owner = WORKDIR_VARIABLE not in os.environ
    if owner:
        os.environ[WORKDIR_VARIABLE] = tempfile.mkdtemp(prefix="taskbalance-lightning-")
    workdir = Path(os.environ[WORKDIR_VARIABLE])
    results = [check(method, workdir) for method in arguments.methods.split(",")]
    if owner:
        print(f"all checks passed: {all(results)}")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
