"""Lightning's ``accumulate_grad_batches`` and validation loop with a balancer (issue 8 items
2 and 3): one balancer call per micro-batch, one balancer step per optimiser step, and the
validation calls (eval mode, no grad) change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import taskbalance as tb

pl = pytest.importorskip("pytorch_lightning")

ACCUMULATE = 3
BATCHES = 12


class TwoTasks(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(2)])
        self.balancer = tb.create("famo", num_tasks=2, accumulation_steps=ACCUMULATE)
        self.validation_states: list[dict] = []

    def _losses(self, batch):
        x, y = batch
        z = self.trunk(x)
        return torch.stack(
            [
                ((head(z).squeeze(1) - y[:, k]) ** 2).mean() + 0.1
                for k, head in enumerate(self.heads)
            ]
        )

    def training_step(self, batch, batch_idx):
        return self.balancer(self._losses(batch))

    def validation_step(self, batch, batch_idx):
        before = {k: v.clone() for k, v in self.balancer.state_dict().items() if torch.is_tensor(v)}
        objective = self.balancer(self._losses(batch))
        after = self.balancer.state_dict()
        self.validation_states.append(
            {"unchanged": all(torch.equal(v, after[k]) for k, v in before.items())}
        )
        return objective

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class ShortLastWindow(TwoTasks):
    """Records the weights of each micro-batch, and ends the balancer's window at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[list[tuple[float, ...]]] = [[]]

    def training_step(self, batch, batch_idx):
        objective = self.balancer(self._losses(batch))
        self.windows[-1].append(tuple(self.balancer.weights.tolist()))
        return objective

    def on_before_optimizer_step(self, optimizer):
        self.balancer.end_window()
        self.windows.append([])


def _loader(seed: int, batches: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8 * batches, 4, generator=generator)
    y = x[:, :2] * torch.tensor([1.0, -2.0])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(epochs: int, accumulate: int = ACCUMULATE, **options) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **options,
    )


def test_accumulate_grad_batches_steps_the_balancer_once_per_optimiser_step():
    model = TwoTasks()
    trainer = _trainer(epochs=1)
    trainer.fit(model, _loader(0, BATCHES), _loader(1, 2))
    assert trainer.global_step == BATCHES // ACCUMULATE
    assert int(model.balancer.num_calls) == BATCHES
    assert int(model.balancer.num_steps) == BATCHES // ACCUMULATE
    assert model.validation_states
    assert all(state["unchanged"] for state in model.validation_states)


def test_an_epochs_short_last_window_ends_the_balancers_window():
    """7 batches, N = 3: Lightning steps after batches 3, 6 and 7 of each epoch. With
    end_window() at each optimiser step, every step's micro-batches share one set of weights
    and the balancer takes exactly one step per optimiser step, in every epoch."""
    model = ShortLastWindow()
    trainer = _trainer(epochs=3, limit_val_batches=0)
    trainer.fit(model, _loader(0, 7))
    windows = model.windows[:-1]  # the list opened after the last step stays empty
    assert model.windows[-1] == []
    assert [len(window) for window in windows] == [3, 3, 1] * 3
    assert trainer.global_step == 9
    assert int(model.balancer.num_steps) == 9
    for window in windows:
        assert len(set(window)) == 1, window
    assert len({window[0] for window in windows}) == 9  # FAMO moved at every optimiser step


def test_the_recipes_module_ends_the_balancers_epochs(monkeypatch):
    """docs/recipes/lightning.md's module calls end_epoch() at each epoch's end: STCH's
    warm-up (and DWA's per-epoch rates) count epochs only there."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    from lightning_module import MultiTaskModule, make_data

    model = MultiTaskModule("stch")
    trainer = _trainer(epochs=2, accumulate=1)
    trainer.fit(model, torch.utils.data.DataLoader(make_data(64), batch_size=16))
    assert int(model.balancer.epochs_done) == 2
    assert int(model.balancer.num_steps) == 8


class ChangedAccumulation(ShortLastWindow):
    """Resumed with another ``accumulate_grad_batches``: the balancer is created with the new
    value and allowed to load a state saved with the old one (docs/recipes/checkpoint.md)."""

    def __init__(self, accumulation: int) -> None:
        super().__init__()
        self.balancer = tb.create("famo", num_tasks=2, accumulation_steps=accumulation)
        self.balancer.allow_changed_hyperparameters("accumulation_steps")


def test_a_resume_with_another_accumulate_grad_batches(tmp_path):
    """8 batches at N = 3 (steps after 3, 6, 8: 9 calls with end_window), resumed at N = 4:
    each of the next epoch's two optimiser steps has one set of weights for its 4 calls."""
    first = ChangedAccumulation(ACCUMULATE)
    trainer = _trainer(epochs=1, limit_val_batches=0)
    trainer.fit(first, _loader(0, 8))
    trainer.save_checkpoint(tmp_path / "first.ckpt")
    assert int(first.balancer.num_calls) == 9
    assert int(first.balancer.num_steps) == 3

    resumed = ChangedAccumulation(4)
    trainer = _trainer(epochs=2, accumulate=4, limit_val_batches=0)
    trainer.fit(resumed, _loader(0, 8), ckpt_path=tmp_path / "first.ckpt")
    windows = resumed.windows[:-1]
    assert [len(window) for window in windows] == [4, 4]
    assert all(len(set(window)) == 1 for window in windows), windows
    assert int(resumed.balancer.num_steps) == 3 + 2
