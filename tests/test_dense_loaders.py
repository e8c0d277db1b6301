"""NYUv2, Cityscapes and CelebA loaders on tiny files written in exactly the published layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from taskbalance.bench.celeba import CelebADataset, celeba_model, read_celeba_lists
from taskbalance.bench.real_datasets import (
    DatasetLayoutError,
    NpyDenseDataset,
    dense_splits,
    horizontal_flip,
    random_scale_crop,
)

H, W = 8, 12


def write_npy_layout(
    root: Path, dataset: str, sizes=(4, 3), label_folder="label", seed=0, size=(H, W)
):
    """MTAN's preprocessed layout: root/{train,val}/{image,label,depth[,normal]}/<i>.npy."""
    rng = np.random.default_rng(seed)
    H, W = size
    arrays = {}
    for split, count in zip(("train", "val"), sizes, strict=True):
        for i in range(count):
            image = rng.random((H, W, 3)).astype(np.float32)
            label = rng.integers(-1, 7, (H, W)).astype(np.float32)  # float, -1 unlabelled
            depth = (rng.random((H, W, 1)) * 5).astype(np.float32)
            depth[0, :3] = 0  # missing measurements
            items = {"image": image, label_folder: label, "depth": depth}
            if dataset == "nyuv2":
                normal = rng.normal(size=(H, W, 3))
                normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
                normal[0, :3] = 0
                items["normal"] = normal.astype(np.float32)
            for folder, array in items.items():
                (root / split / folder).mkdir(parents=True, exist_ok=True)
                np.save(root / split / folder / f"{i}.npy", array)
            arrays[(split, i)] = items
    return arrays


def test_nyuv2_items_are_the_files_moved_to_channels_first(tmp_path):
    arrays = write_npy_layout(tmp_path, "nyuv2")
    data = NpyDenseDataset(tmp_path, "val", "nyuv2")
    assert len(data) == 3
    image, (label, depth, normal) = data[2]
    source = arrays[("val", 2)]
    np.testing.assert_array_equal(image.numpy(), source["image"].transpose(2, 0, 1))
    assert label.dtype == torch.int64
    np.testing.assert_array_equal(label.numpy(), source["label"].astype(np.int64))
    np.testing.assert_array_equal(depth.numpy(), source["depth"].transpose(2, 0, 1))
    np.testing.assert_array_equal(normal.numpy(), source["normal"].transpose(2, 0, 1))


def test_cityscapes_reads_label_7_or_label_19_and_has_no_normals(tmp_path):
    write_npy_layout(tmp_path / "c7", "cityscapes", label_folder="label_7")
    image, targets = NpyDenseDataset(tmp_path / "c7", "train", "cityscapes")[0]
    assert len(targets) == 2
    assert image.shape == (3, H, W)
    write_npy_layout(tmp_path / "c19", "cityscapes", label_folder="label_19")
    assert len(NpyDenseDataset(tmp_path / "c19", "train", "cityscapes", num_classes=19)) == 4
    with pytest.raises(DatasetLayoutError, match="label_19"):
        NpyDenseDataset(tmp_path / "c7", "train", "cityscapes", num_classes=19)


def test_papers_splits_and_a_held_out_validation(tmp_path):
    write_npy_layout(tmp_path, "nyuv2", sizes=(6, 2))
    train, validation, test = dense_splits(tmp_path, "nyuv2")
    assert (len(train), len(test)) == (6, 2)
    assert validation is test  # the papers select on (and report) val/
    assert train.augment
    assert not test.augment
    train, validation, test = dense_splits(tmp_path, "nyuv2", val_size=2, data_seed=1)
    assert (len(train), len(validation), len(test)) == (4, 2, 2)
    assert not set(train.indices) & set(validation.indices)
    assert not validation.augment
    with pytest.raises(ValueError, match="val_size"):
        dense_splits(tmp_path, "nyuv2", val_size=6)


def test_augmented_items_keep_shapes_and_conventions(tmp_path):
    write_npy_layout(tmp_path, "nyuv2")
    data = NpyDenseDataset(tmp_path, "train", "nyuv2", augment=True)
    torch.manual_seed(0)
    for index in range(len(data)):
        image, (label, depth, normal) = data[index]
        assert image.shape == (3, H, W)
        assert label.shape == (H, W)
        assert set(label.unique().tolist()) <= set(range(-1, 7))
        assert depth.shape == (1, H, W)
        assert normal.shape == (3, H, W)


def test_random_scale_crop_zooms_and_divides_depth_by_the_scale():
    torch.manual_seed(0)
    image = torch.arange(H * W, dtype=torch.float32).reshape(1, H, W).repeat(3, 1, 1)
    label = torch.arange(H * W).reshape(H, W)
    depth = torch.full((1, H, W), 3.0)
    _, out_label, out_depth, out_normal = random_scale_crop(
        image, label, depth, None, scales=(2.0,)
    )
    assert out_normal is None
    torch.testing.assert_close(out_depth, torch.full((1, H, W), 1.5))
    # Nearest-neighbour labels come from a H/2 × W/2 window of the original.
    rows, cols = out_label // W, out_label % W
    assert int(rows.max() - rows.min()) == H // 2 - 1
    assert int(cols.max() - cols.min()) == W // 2 - 1
    # Scale 1: the window is the whole image and nothing changes.
    same = random_scale_crop(image, label, depth, None, scales=(1.0,))
    torch.testing.assert_close(same[0], image)
    assert torch.equal(same[1], label)


def test_horizontal_flip_mirrors_and_negates_normal_x():
    normal = torch.nn.functional.normalize(torch.randn(3, H, W), dim=0)
    image = torch.rand(3, H, W)
    _, _, _, flipped = horizontal_flip(image, torch.zeros(H, W), torch.ones(1, H, W), normal)
    torch.testing.assert_close(flipped[0], -normal[0].flip(-1))
    torch.testing.assert_close(flipped[1:], normal[1:].flip(-1))


def test_missing_root_split_or_folder_shows_the_expected_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)not a directory.*train/.*normal/0\.npy"):
        NpyDenseDataset(tmp_path / "nowhere", "train", "nyuv2")
    write_npy_layout(tmp_path, "nyuv2")
    for path in (tmp_path / "val" / "normal").iterdir():
        path.unlink()
    (tmp_path / "val" / "normal").rmdir()
    with pytest.raises(DatasetLayoutError, match=r"(?s)val/normal.*is missing.*label/0\.npy"):
        NpyDenseDataset(tmp_path, "val", "nyuv2")


def test_gaps_uneven_counts_and_wrong_shapes_are_named(tmp_path):
    write_npy_layout(tmp_path, "nyuv2")
    (tmp_path / "train" / "depth" / "1.npy").unlink()
    files = len(list((tmp_path / "train" / "image").iterdir()))
    last = f"{files - 1}.npy"  # the range is the highest file's, not one short of it
    with pytest.raises(
        DatasetLayoutError, match=rf"0\.npy … {last} without gaps; missing \['1\.npy'\]"
    ):
        NpyDenseDataset(tmp_path, "train", "nyuv2")
    np.save(tmp_path / "train" / "depth" / "1.npy", np.ones((H, W, 1), np.float32))
    np.save(tmp_path / "train" / "depth" / "4.npy", np.ones((H, W, 1), np.float32))
    with pytest.raises(DatasetLayoutError, match="same number"):
        NpyDenseDataset(tmp_path, "train", "nyuv2")
    (tmp_path / "train" / "depth" / "4.npy").unlink()
    np.save(tmp_path / "train" / "image" / "0.npy", np.ones((3, H, W), np.float32))
    with pytest.raises(DatasetLayoutError, match=r"shape \(3, 8, 12\).*channel last"):
        NpyDenseDataset(tmp_path, "train", "nyuv2")


def test_labels_outside_the_classes_and_8_bit_images_are_named(tmp_path):
    """Labels 0 … C−1, -1 and 255 are read; any other value was taken as unlabelled, so
    classes numbered from 1 or another class set trained silently on the wrong classes.
    8-bit images reached the model as 0 … 255."""
    write_npy_layout(tmp_path, "cityscapes", label_folder="label_7")
    label = np.full((H, W), 3, np.float32)
    label[0, 0], label[0, 1] = -1, 255  # both unlabelled
    np.save(tmp_path / "val" / "label_7" / "1.npy", label)
    data = NpyDenseDataset(tmp_path, "val", "cityscapes")
    assert int(data[1][1][0][0, 1]) == 255
    label[2, 2] = 7  # a class past label_7's 0 … 6
    np.save(tmp_path / "val" / "label_7" / "1.npy", label)
    with pytest.raises(DatasetLayoutError, match=r"1\.npy: label 7; expected classes 0 … 6"):
        data[1]
    data[0]  # the other scenes still read
    np.save(tmp_path / "train" / "image" / "0.npy", np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DatasetLayoutError, match=r"dtype torch.uint8; expected float images"):
        NpyDenseDataset(tmp_path, "train", "cityscapes")


def test_an_image_of_another_size_than_its_label_names_both(tmp_path):
    write_npy_layout(tmp_path, "nyuv2")
    np.save(tmp_path / "val" / "image" / "0.npy", np.zeros((H + 2, W, 3), np.float32))
    with pytest.raises(DatasetLayoutError, match=r"shape \(10, 12, 3\); expected \(8, 12, 3\)"):
        NpyDenseDataset(tmp_path, "val", "nyuv2")


def test_unreadable_and_zero_padded_files_are_named(tmp_path):
    """A truncated or empty file failed with numpy's message and no file name; a zero-padded
    name (0001.npy) passed the numbering check and failed as a missing 1.npy."""
    write_npy_layout(tmp_path, "nyuv2")
    depth = tmp_path / "val" / "depth" / "2.npy"
    depth.write_bytes(depth.read_bytes()[:100])
    data = NpyDenseDataset(tmp_path, "val", "nyuv2")  # scene 0 is fine
    with pytest.raises(DatasetLayoutError, match=r"depth/2\.npy: cannot be read as a \.npy"):
        data[2]
    depth.write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match=r"depth/2\.npy: cannot be read.*EOFError"):
        data[2]
    (tmp_path / "train" / "label" / "1.npy").rename(tmp_path / "train" / "label" / "01.npy")
    with pytest.raises(DatasetLayoutError, match=r"unpadded numbers.*\['01\.npy'\]"):
        NpyDenseDataset(tmp_path, "train", "nyuv2")


@pytest.mark.parametrize(
    ("folder", "change", "message"),
    [
        ("image", lambda a: a * 255, r"image/0\.npy: values in \[.*expected floats in \[0, 1\]"),
        ("depth", lambda a: np.where(a > 2, np.nan, a), r"depth/0\.npy: NaN or infinite"),
        ("depth", lambda a: a - 1, r"depth/0\.npy: negative depth"),
        ("normal", lambda a: (a + 1) / 2, r"normal/0\.npy: normals of lengths.*unit vectors"),
        ("normal", lambda a: 2 * a, r"normal/0\.npy: normals of lengths.*normalise them"),
    ],
)
def test_wrongly_encoded_values_of_scene_0_are_named(tmp_path, folder, change, message):
    """Images in 0 … 255, normals stored as an RGB map (n + 1)/2 and NaN depth trained
    without complaint; the normal metrics normalise only the prediction."""
    arrays = write_npy_layout(tmp_path, "nyuv2")
    NpyDenseDataset(tmp_path, "train", "nyuv2")  # as written: accepted
    source = arrays[("train", 0)][folder]
    changed = change(source)
    if folder == "normal":
        changed[0, :3] = 0  # missing normals stay 0
    np.save(tmp_path / "train" / folder / "0.npy", changed.astype(np.float32))
    with pytest.raises(DatasetLayoutError, match=message):
        NpyDenseDataset(tmp_path, "train", "nyuv2")


def test_the_benchmark_refuses_a_size_the_model_cannot_take_and_averages_per_batch(tmp_path):
    from taskbalance.bench.real_datasets import METRIC_REDUCTION, build_nyuv2

    write_npy_layout(tmp_path / "odd", "nyuv2")  # 8×12: 12 is not a multiple of 8
    with pytest.raises(DatasetLayoutError, match=r"8×12; the model \(3 levels\).*by 8 \(by 32"):
        build_nyuv2(str(tmp_path / "odd"), small=True)
    write_npy_layout(tmp_path / "even", "nyuv2", size=(8, 16))
    benchmark = build_nyuv2(str(tmp_path / "even"), small=True)
    assert benchmark.settings["metric_reduction"] == METRIC_REDUCTION == "batch"
    # Nash-MTL's test loader takes the training batch size: the batches the errors average over
    assert benchmark.defaults.eval_batch_size is None
    for task in benchmark.tasks[1:]:  # depth and normals
        (metrics,) = task.metrics
        assert [accumulator.reduction for accumulator in metrics.accumulators] == ["batch"] * len(
            metrics.accumulators
        )


ATTRIBUTES = [f"Attr_{k}" for k in range(40)]


def write_celeba(root: Path, partition=(0, 0, 0, 1, 2, 2), official=True, seed=0):
    """The official layout (Img/, Anno/, Eval/) or the flat one; returns the ±1 labels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / ("Img/img_align_celeba" if official else "img_align_celeba")
    attr = root / ("Anno/list_attr_celeba.txt" if official else "list_attr_celeba.txt")
    split = root / ("Eval/list_eval_partition.txt" if official else "list_eval_partition.txt")
    for path in (images, attr.parent, split.parent):
        path.mkdir(parents=True, exist_ok=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partition))]
    values = rng.choice([-1, 1], size=(len(names), 40))
    for name in names:
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)  # CelebA's aligned size
        Image.fromarray(pixels).save(images / name)
    rows = [
        f"{name} " + " ".join(f"{v:2d}" for v in row)
        for name, row in zip(names, values, strict=True)
    ]
    attr.write_text("\n".join([str(len(names)), " ".join(ATTRIBUTES), *rows]) + "\n")
    split.write_text("\n".join(f"{n} {p}" for n, p in zip(names, partition, strict=True)) + "\n")
    return values


@pytest.mark.parametrize("official", [True, False])
def test_celeba_splits_labels_and_64x64_images(tmp_path, official):
    values = write_celeba(tmp_path, official=official)
    _, attributes, _, labels, codes = read_celeba_lists(tmp_path)
    assert attributes == ATTRIBUTES
    assert codes.tolist() == [0, 0, 0, 1, 2, 2]
    np.testing.assert_array_equal(labels.numpy(), (values == 1).astype(np.float32))
    test = CelebADataset(tmp_path, "test")
    assert len(test) == 2
    image, targets = test[1]
    assert image.shape == (3, 64, 64)
    assert 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert len(targets) == 40
    assert targets[0].shape == (1,)
    expected = (values[5] == 1).astype(np.float32)
    np.testing.assert_array_equal(torch.cat(targets).numpy(), expected)
    assert len(CelebADataset(tmp_path, "train")) == 3
    assert len(CelebADataset(tmp_path, "train", limit=2)) == 2


def test_celeba_image_matches_a_pil_resize(tmp_path):
    from PIL import Image

    write_celeba(tmp_path)
    image, _ = CelebADataset(tmp_path, "val")[0]
    with Image.open(tmp_path / "Img/img_align_celeba/000004.jpg") as source:
        expected = np.asarray(source.convert("RGB").resize((64, 64), Image.BILINEAR)) / 255.0
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_celeba_bad_layouts_are_named(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"(?s)not a directory.*list_attr_celeba\.txt"):
        CelebADataset(tmp_path / "nowhere")
    write_celeba(tmp_path)
    (tmp_path / "Eval/list_eval_partition.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"(?s)list_eval_partition\.txt.*Img/"):
        CelebADataset(tmp_path)
    write_celeba(tmp_path / "reordered")
    partition = tmp_path / "reordered/Eval/list_eval_partition.txt"
    partition.write_text("\n".join(reversed(partition.read_text().split("\n")[:-1])) + "\n")
    with pytest.raises(DatasetLayoutError, match="same images in the same order"):
        CelebADataset(tmp_path / "reordered")
    with pytest.raises(ValueError, match="split"):
        CelebADataset(tmp_path, "validation")


def test_celeba_torchvision_root_is_read(tmp_path):
    """torchvision.datasets.CelebA(root) keeps the flat layout in root/celeba/."""
    values = write_celeba(tmp_path / "celeba", official=False)
    _, _, _, labels, _ = read_celeba_lists(tmp_path)
    np.testing.assert_array_equal(labels.numpy(), (values == 1).astype(np.float32))


def test_celeba_model_gives_a_logit_per_attribute():
    trunk, heads = celeba_model(num_attributes=40, width=4)
    features = trunk(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 32)
    assert len(heads) == 40
    assert heads[0](features).shape == (2, 1)
    paper_trunk, _ = celeba_model()
    assert sum(p.numel() for p in paper_trunk.parameters()) > 4_000_000


def test_the_evaluation_batch_follows_a_batch_size_override(tmp_path, monkeypatch):
    """Per-batch errors depend on the evaluation batch, which Nash-MTL's trainer takes from
    the training batch size: a --batch-size override must reach it (review)."""
    from taskbalance.bench import harness
    from taskbalance.bench.harness import TrainConfig, train_run
    from taskbalance.bench.real_datasets import build_nyuv2

    write_npy_layout(tmp_path, "nyuv2", sizes=(3, 3), size=(8, 16))
    benchmark = build_nyuv2(str(tmp_path), small=True)
    sizes = []
    real_loader = harness._loader

    def spy(data, defaults, **options):
        sizes.append(options.get("batch_size"))
        return real_loader(data, defaults, **options)

    monkeypatch.setattr(harness, "_loader", spy)
    train_run(benchmark, "ew", config=TrainConfig(batch_size=3, epochs=1))
    evaluation = [size for size in sizes if size is not None]  # training's takes the default
    assert len(evaluation) >= 2  # validation and test
    assert set(evaluation) == {3}
