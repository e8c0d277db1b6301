"""benchmarks/overhead.py runs end to end (tiny settings) and pools its reference copies."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_script", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_section_with_pooled_references(overhead, tmp_path, capsys):
    table = tmp_path / "overhead.csv"
    steps = 2
    overhead.main(
        ["--ks", "2", "--methods", "mgda,upgrad,uw", "--steps", str(steps), "--warmup", "1",
         "--torchjd", "none", "--csv", str(table)]
    )  # fmt: skip
    report = capsys.readouterr().out
    for heading in ("Loss-based methods", "features mode", "same heads", "parameters mode"):
        assert heading in report
    rows = {row["variant"]: row for row in csv.DictReader(table.open())}
    assert not [key for key in rows if "#" in key]  # the copies are merged, not listed
    copies = overhead.REFERENCE_COPIES
    for reference in ("ew", "lower_bound_loop/features", overhead.UNWEIGHTED_LOWER_BOUND,
                      "lower_bound/params"):  # fmt: skip
        assert int(rows[reference]["n"]) == copies * steps
    assert int(rows["mgda/features"]["n"]) == steps
    assert float(rows["mgda/features"]["median_ms"]) > 0


def test_the_unweighted_heads_reference_gives_z_jtw_and_the_heads_their_own_gradients(
    overhead, monkeypatch
):
    """Against the weighted loop (same fixed w = 1/K): the trunk's gradient is the same Jᵀw,
    and each head's gradient is its own loss's, K times the weighted one."""
    import copy

    import torch

    K = 3
    torch.manual_seed(0)
    template = overhead.MultiTaskMLP(K)
    x, y = torch.randn(8, overhead.DIM_IN), torch.randn(8, K)
    monkeypatch.setattr(overhead, "_fresh", lambda model: model)  # train the model passed in
    grads = {}
    for heads in ("weighted", "unweighted"):
        model = copy.deepcopy(template)
        overhead.make_loop_lower_bound_step(model, x, y, "features", heads)()
        grads[heads] = (
            [p.grad.clone() for p in model.trunk.parameters()],
            [p.grad.clone() for p in model.heads.parameters()],
        )
    (trunk_w, heads_w), (trunk_u, heads_u) = grads["weighted"], grads["unweighted"]
    for a, b in zip(trunk_w, trunk_u, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(heads_w, heads_u, strict=True):
        torch.testing.assert_close(b, K * a, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="features-mode reference"):
        overhead.make_loop_lower_bound_step(template, x, y, "params", "unweighted")


def test_width_and_batch_set_the_model_and_reuse_rows_rows_are_reported(overhead, capsys):
    pytest.importorskip("torchjd")
    widths = (overhead.WIDTH, overhead.BATCH)
    try:
        overhead.main(
            ["--ks", "4", "--methods", "mgda", "--modes", "params", "--steps", "1",
             "--warmup", "0", "--torchjd", "mgda", "--width", "16", "--batch", "8"]
        )  # fmt: skip
    finally:
        overhead.WIDTH, overhead.BATCH = widths  # the module is shared with the other tests
    report = capsys.readouterr().out
    assert "3×16 ReLU, batch 8" in report
    assert "| `reuse_rows=True` |" in report


@pytest.mark.parametrize("mode", ["features", "params"])
def test_the_hand_written_graddrop_is_graddrop(overhead, monkeypatch, mode):
    """The reference GradDrop is read against computes what ``graddrop`` (seed 0) computes:
    the same gradient on every parameter, heads and trunk, from the same draws."""
    import copy

    import torch

    K = 3
    torch.manual_seed(0)
    template = overhead.MultiTaskMLP(K)
    x, y = torch.randn(8, overhead.DIM_IN), torch.randn(8, K)
    models = [copy.deepcopy(template), copy.deepcopy(template)]
    built = iter(models)
    monkeypatch.setattr(overhead, "_fresh", lambda model: next(built))
    overhead.make_graddrop_by_hand_step(template, x, y, mode)()
    overhead.make_balancer_step("graddrop", template, x, y, mode)()
    by_hand, ours = ([p.grad for p in model.parameters()] for model in models)
    # The reference divides by Σ|G_k| + 1e-7 as LibMTL does; taskbalance decides P > U without
    # a division or an epsilon, so the rare coordinate whose P the epsilon moves across U (a
    # tiny Σ|G_k|) may differ; every other entry agrees to rounding
    for reference, value in zip(by_hand, ours, strict=True):
        differs = ~torch.isclose(value, reference, rtol=1e-5, atol=1e-6)
        assert int(differs.sum()) <= max(1, reference.numel() // 1000)
    dropped = 0
    # the masks dropped something: the comparison is not that of two plain sums
    trunk = list(models[0].trunk.parameters())
    plain = copy.deepcopy(template)
    losses, _ = plain(x, y)
    torch.stack(losses).sum().backward()
    for param, unmasked in zip(trunk, plain.trunk.parameters(), strict=True):
        dropped += int((param.grad - unmasked.grad).abs().gt(1e-6).sum())
    assert dropped > 0
