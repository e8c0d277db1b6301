"""MTAN's attention network (SegNet-MTAN): shapes, masks, size, the shared/task split, and the
harness running gradient methods on it in parameters mode over exactly its shared parameters."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

import taskbalance as tb
from taskbalance.bench import cli, load_benchmark, scenes
from taskbalance.bench.compare import BenchmarkSource, Job, _run_key
from taskbalance.bench.dense import depth_loss, normal_loss, segmentation_loss
from taskbalance.bench.harness import (
    Method,
    TrainConfig,
    balancer_arguments,
    check_method,
    train_run,
)
from taskbalance.bench.models import MultiTaskModel, shared_submodule_name
from taskbalance.bench.mtan import SegNetMTAN
from taskbalance.bench.segnet import CPU_FILTERS, PAPER_FILTERS

pytest.importorskip("numpy")

from test_dense_loaders import write_npy_layout

NYUV2_HEADS = ((13, 1, 3), (False, False, True))


def _conv(a: int, b: int) -> int:
    """Conv 3×3 (a → b, bias) → BatchNorm(b): MTAN's conv_layer."""
    return 9 * a * b + b + 2 * b


def _attention(a: int, b: int, c: int) -> int:
    """Conv 1×1 (a → b) → BN → ReLU → Conv 1×1 (b → c) → BN: MTAN's att_layer([a, b, c])."""
    return a * b + b + 2 * b + b * c + c + 2 * c


def _head(a: int, c: int) -> int:
    """Conv 3×3 (a → a) → Conv 1×1 (a → c): MTAN's conv_layer([a, c], pred=True)."""
    return 9 * a * a + a + a * c + c


def _reference_counts(out_channels: tuple[int, ...]) -> tuple[int, int, int]:
    """(shared, one task's attention, all heads) of lorenmt/mtan's model_segnet_mtan.py, from the
    layer shapes it declares (5 levels, filter = [64, 128, 256, 512, 512])."""
    f = [64, 128, 256, 512, 512]
    encoder_block = _conv(3, f[0]) + sum(_conv(f[i], f[i + 1]) for i in range(4))
    decoder_block = _conv(f[0], f[0]) + sum(_conv(f[i + 1], f[i]) for i in range(4))
    conv_block_enc = _conv(f[0], f[0]) + _conv(f[1], f[1])
    conv_block_enc += sum(2 * _conv(f[i + 1], f[i + 1]) for i in range(1, 4))
    conv_block_dec = _conv(f[0], f[0]) + _conv(f[0], f[0])
    conv_block_dec += sum(2 * _conv(f[i], f[i]) for i in range(1, 4))
    encoder_block_att = _conv(f[0], f[1]) + sum(_conv(f[i + 1], f[i + 2]) for i in range(3))
    encoder_block_att += _conv(f[4], f[4])
    decoder_block_att = _conv(f[0], f[0]) + sum(_conv(f[i + 1], f[i]) for i in range(3))
    decoder_block_att += _conv(f[4], f[4])
    shared = (
        encoder_block
        + decoder_block
        + conv_block_enc
        + conv_block_dec
        + encoder_block_att
        + decoder_block_att
    )
    encoder_att = _attention(f[0], f[0], f[0])
    encoder_att += sum(_attention(2 * f[i + 1], f[i + 1], f[i + 1]) for i in range(4))
    decoder_att = _attention(2 * f[0], f[0], f[0])
    decoder_att += sum(_attention(f[i + 1] + f[i], f[i], f[i]) for i in range(4))
    heads = sum(_head(f[0], c) for c in out_channels)
    return shared, encoder_att + decoder_att, heads


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_outputs_have_the_task_shapes_no_features_and_unit_normals():
    torch.manual_seed(0)
    model = SegNetMTAN(*NYUV2_HEADS, filters=CPU_FILTERS)
    features, (seg, depth, normal) = model(torch.rand(2, 3, 16, 24))
    assert features is None
    assert seg.shape == (2, 13, 16, 24)
    assert depth.shape == (2, 1, 16, 24)
    torch.testing.assert_close(normal.norm(dim=1), torch.ones(2, 16, 24))
    # Any number of tasks and of levels (the reference has 3 tasks and 5 levels).
    _, outputs = SegNetMTAN((4, 2, 1, 5), filters=(4,))(torch.rand(2, 3, 4, 6))
    assert [tuple(o.shape) for o in outputs] == [(2, c, 4, 6) for c in (4, 2, 1, 5)]


def test_bad_sizes_and_arguments_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        SegNetMTAN((2,), filters=CPU_FILTERS)(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match="unit_outputs"):
        SegNetMTAN((13, 1), (False,), filters=CPU_FILTERS)
    with pytest.raises(ValueError, match="filters"):
        SegNetMTAN((2,), filters=())


def test_attention_masks_are_in_the_open_unit_interval_and_gate_the_shared_maps():
    torch.manual_seed(1)
    model = SegNetMTAN(*NYUV2_HEADS, filters=CPU_FILTERS)
    masks: list[torch.Tensor] = []
    for module in model.tasks.modules():
        if isinstance(module, nn.Sigmoid):
            module.register_forward_hook(lambda _m, _i, output: masks.append(output))
    with torch.no_grad():
        model(torch.rand(2, 3, 16, 24))
    levels = len(CPU_FILTERS)
    assert len(masks) == 3 * 2 * levels  # per task: one per encoder and per decoder level
    for mask in masks:
        assert float(mask.min()) > 0.0
        assert float(mask.max()) < 1.0
    maps = model.trunk(torch.rand(2, 3, 16, 24))
    gated = maps.encoder_last + maps.decoder_output[::-1]  # the forward's order, per task
    assert [m.shape for m in masks[: 2 * levels]] == [t.shape for t in gated]


def test_papers_size_matches_the_reference_formula_and_the_published_size():
    shared, attention, heads = _reference_counts((13, 1, 3))
    model = SegNetMTAN(*NYUV2_HEADS, filters=PAPER_FILTERS)
    assert _count(model.trunk) == shared == 35_163_456
    assert [_count(task) - _count(task.head) for task in model.tasks] == [attention] * 3
    assert sum(_count(task.head) for task in model.tasks) == heads
    total = _count(model)
    assert total == shared + 3 * attention + heads == 44_229_073
    # The MTAN paper: 1.77 × a single-task SegNet (its script divides by 24,981,069): 44.2 M.
    assert round(total / 24_981_069, 2) == 1.77
    assert round(total / 1e6, 1) == 44.2
    # Cityscapes' two tasks (7 classes, depth), as FAMO's copy of the network.
    shared, attention, heads = _reference_counts((7, 1))
    assert _count(SegNetMTAN((7, 1), filters=PAPER_FILTERS)) == shared + 2 * attention + heads


def test_initialisation_is_the_references():
    torch.manual_seed(2)
    model = SegNetMTAN((3, 1), filters=(4, 8))
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            assert not bool(module.bias.any())
        if isinstance(module, nn.BatchNorm2d):
            assert bool((module.weight == 1).all())
            assert bool((module.bias == 0).all())
    # Xavier-normal: std sqrt(2 / (fan_in + fan_out)); PyTorch's default (uniform, bound
    # 1 / sqrt(fan_in)) gives half that for this 8 → 4 layer.
    conv = model.trunk.segnet.decoder[1][0][0]
    fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
    expected = (2 / (fan_in + fan_out)) ** 0.5
    assert 0.8 * expected < float(conv.weight.detach().std()) < 1.2 * expected


def _losses(outputs: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    seg, depth, normal = outputs
    labels = torch.randint(-1, 13, seg.shape[:1] + seg.shape[2:], generator=generator)
    depth_target = torch.rand(depth.shape, generator=generator) + 1
    normal_target = nn.functional.normalize(torch.randn(normal.shape, generator=generator), dim=1)
    return [
        segmentation_loss(seg, labels),
        depth_loss(depth, depth_target),
        normal_loss(normal, normal_target),
    ]


def test_each_loss_reaches_the_whole_trunk_and_only_its_own_attention_and_head():
    torch.manual_seed(3)
    model = SegNetMTAN(*NYUV2_HEADS, filters=(4, 8, 16))
    assert shared_submodule_name(model) == "trunk"
    trunk = list(model.trunk.parameters())
    tasks = [list(task.parameters()) for task in model.tasks]
    task_parameters = [p for group in tasks for p in group]
    everything = {id(p) for p in model.parameters()}
    listed = [id(p) for p in trunk + task_parameters]
    assert sorted(listed) == sorted(everything)  # a partition: nothing twice, nothing left out
    _, outputs = model(torch.rand(2, 3, 16, 16))
    losses = _losses(outputs, torch.Generator().manual_seed(0))
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, trunk + task_parameters, allow_unused=True, retain_graph=True
        )
        shared_grads, rest = grads[: len(trunk)], grads[len(trunk) :]
        assert all(g is not None for g in shared_grads), f"task {k} misses a shared parameter"
        conv_weights = [g for g, p in zip(shared_grads, trunk, strict=True) if p.dim() == 4]
        assert all(float(g.abs().sum()) > 0 for g in conv_weights)
        start = 0
        for j, group in enumerate(tasks):
            own = rest[start : start + len(group)]
            start += len(group)
            if j == k:
                assert all(g is not None for g in own), f"task {k} misses its own parameters"
            else:
                assert all(g is None for g in own), f"task {k}'s loss reaches task {j}'s modules"


@pytest.fixture(scope="module")
def tiny_nyuv2(tmp_path_factory):
    root = tmp_path_factory.mktemp("nyuv2")
    # 16×32: divisible by 2³ for the CPU-sized (3-level) networks of --small.
    write_npy_layout(root, "nyuv2", sizes=(2, 2), size=(16, 32))
    return root


def test_real_benchmarks_default_to_mtan_and_record_it(tiny_nyuv2):
    benchmark = load_benchmark("nyuv2", data_root=str(tiny_nyuv2), small=True)
    assert benchmark.settings["model"] == "mtan"
    assert isinstance(benchmark.build_model(), SegNetMTAN)
    split = load_benchmark("nyuv2", data_root=str(tiny_nyuv2), small=True, model="segnet")
    assert split.settings["model"] == "segnet"
    assert isinstance(split.build_model(), MultiTaskModel)
    assert scenes.DEFAULT_MODEL == "segnet"  # scenes keeps the split SegNet by default


def test_gradient_methods_get_exactly_the_shared_parameters(tiny_nyuv2):
    benchmark = load_benchmark("nyuv2", data_root=str(tiny_nyuv2), small=True, model="mtan")
    model = benchmark.build_model()
    for name in ("mgda", "upgrad", "moco"):
        params = balancer_arguments(Method(name), benchmark, seed=0, model=model)["params"]
        assert [id(p) for p in params] == [id(p) for p in model.trunk.parameters()]
    assert "params" not in balancer_arguments(Method("ew"), benchmark, seed=0, model=model)


def test_diagnostics_are_taken_over_the_shared_parameters(tiny_nyuv2, monkeypatch):
    benchmark = load_benchmark("nyuv2", data_root=str(tiny_nyuv2), small=True, model="mtan")
    shapes = [p.shape for p in benchmark.build_model().trunk.parameters()]
    seen: list[object] = []
    original = tb.gramian

    def recording(losses, wrt=None, **options):
        seen.append(wrt)
        return original(losses, wrt, **options)

    monkeypatch.setattr(tb, "gramian", recording)
    run = train_run(benchmark, "mgda", config=TrainConfig(epochs=1, diagnostics_every=1))
    assert run.failure is None
    assert run.hyperparameters["params"] == "trunk"
    assert len(run.diagnostic_grams) == 1
    (wrt,) = seen
    assert isinstance(wrt, list)
    assert [p.shape for p in wrt] == shapes


def test_features_mode_is_refused_on_mtan(tiny_nyuv2):
    benchmark = load_benchmark("nyuv2", data_root=str(tiny_nyuv2), small=True, model="mtan")
    with pytest.raises(ValueError, match=r"features mode.*no single shared feature tensor"):
        check_method(Method("mgda", {"params": None}), benchmark)
    split = load_benchmark("nyuv2", data_root=str(tiny_nyuv2), small=True, model="segnet")
    check_method(Method("mgda", {"params": None}), split)  # the split SegNet has features


def test_compare_keys_name_the_model_that_ran():
    source, job, config = BenchmarkSource("scenes"), Job(Method("ew"), None, 0), TrainConfig()
    assert _run_key(source, job, config, "mtan") != _run_key(source, job, config, "segnet")
    assert "model" not in _run_key(source, job, config)
    assert "model" not in _run_key(source, job, config)["benchmark"]
    # --model segnet and the default (segnet on scenes) are the same runs.
    named = BenchmarkSource("scenes", model="segnet")
    assert _run_key(named, job, config, "segnet") == _run_key(source, job, config, "segnet")


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mgda", "upgrad"])
def test_train_mtan_small_end_to_end(capsys, tmp_path, tiny_nyuv2, method):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    argv = ["train", "--bench", "nyuv2", "--data-root", str(tiny_nyuv2), "--model", "mtan"]
    argv += ["--small", "--epochs", "1", "--method", method, "--quiet", "--out", str(out)]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    assert "segmentation/miou" in stdout
    assert "training stopped" not in stdout
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["benchmark"]["settings"]["model"] == "mtan"
    assert metadata["methods"][0]["mode"] == "parameters of 'trunk'"
    with open(out / "diagnostics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3  # one Gramian (step 0), three task pairs
    assert all(abs(float(row["cosine"])) <= 1 for row in rows)


def test_cli_refuses_features_mode_and_unknown_models(capsys, tiny_nyuv2):
    base = ["train", "--bench", "nyuv2", "--data-root", str(tiny_nyuv2), "--small", "--quiet"]
    code, _, err = _run([*base, "--model", "mtan", "--method", "mgda[params=None]"], capsys)
    assert code == 2
    assert "features mode" in err
    assert "params=trunk" in err
    assert "Traceback" not in err
    code, _, err = _run([*base, "--model", "resnet", "--method", "ew"], capsys)
    assert code == 2
    assert "expected one of ['segnet', 'mtan'], got 'resnet'" in err
    code, _, err = _run(
        ["train", "--bench", "noisy-regression", "--model", "mtan", "--method", "ew"], capsys
    )
    assert code == 2
    assert "--model mtan" in err
    assert "single model" in err
