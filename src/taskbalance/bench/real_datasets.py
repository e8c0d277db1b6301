"""NYUv2 and Cityscapes in the preprocessed ``.npy`` layout of MTAN, LibMTL and Nash-MTL.

The files are the user's (never downloaded); the layout, shapes and conventions are those the
published comparisons read (MTAN's ``create_dataset.py``, copied by CAGrad, Nash-MTL, FAMO and
LibMTL)::

    NYUv2 root/                          Cityscapes root/
      train/  (795 scenes)                 train/  (2975 scenes)
        image/0.npy   288×384×3 float        image/0.npy     128×256×3 float in [0, 1]
        label/0.npy   288×384 (−1 = none)    label_7/0.npy   128×256 (−1 = none; or label_19/)
        depth/0.npy   288×384×1 (0 = none)   depth/0.npy     128×256×1 (0 = none)
        normal/0.npy  288×384×3 (unit or 0)
      val/    (654 scenes, same folders)   val/    (500 scenes, same folders)

Files are numbered ``0.npy … (n−1).npy`` in every folder of a split, and every scene of a split
has scene 0's shapes (each item is checked as it is read). Arrays are channel-last and are moved
to ``[C, H, W]``; labels come back as int64 ``[H, W]`` (anything outside ``[0, num_classes)``,
e.g. ``−1`` or ``255``, is unlabelled for the losses and metrics). Cityscapes' labels are the
7-class ``label_7/`` of the published tables or the 19-class ``label_19/``: ``--bench
cityscapes`` reads ``label_19/`` only when ``label_7/`` is absent (:func:`cityscapes_classes`);
in Python, ``build_cityscapes(..., num_classes=19)`` or ``NpyDenseDataset(..., num_classes=19)``
asks for it.

Splits, as the papers: ``train/`` trains and ``val/`` is the reported test split. The papers
select nothing on a separate validation split (MTAN, Nash-MTL and LibMTL print ``val/`` as
"test"; Nash-MTL averages the last 10 epochs); ``val_size=0`` (default) gives ``val/`` as the
validation split too, as they do, and ``val_size=n`` holds ``n`` training scenes out instead
(Nash-MTL's Cityscapes variant holds out 475 with seed 42).

Augmentation (training split only, ``augment=True``, as Nash-MTL / CAGrad / LibMTL; MTAN's
paper had none): a random scale-crop (scale ``s ∈ {1.0, 1.2, 1.5}`` uniformly, a random
``H/s × W/s`` window resized back to ``H × W``: bilinear for the image and normals, nearest for
labels and depth, and depth divided by ``s``), then a horizontal flip with probability 1/2
(negating the normals' x channel). Random draws use torch's generator, so a seeded run (and each
``DataLoader`` worker, which torch seeds) is reproducible.

Example:
    >>> layout_text("nyuv2").splitlines()[1]
    '  train/'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.utils.data import Dataset

from taskbalance.bench.api import (
    Benchmark,
    BenchmarkError,
    TrainingDefaults,
    register_benchmark,
    require_module,
)
from taskbalance.bench.dense import dense_tasks
from taskbalance.bench.mtan import check_dense_model, dense_model
from taskbalance.bench.segnet import CPU_FILTERS, PAPER_FILTERS
from taskbalance.metrics import Reduction

#: MTAN's random scale-crop factors.
SCALES = (1.0, 1.2, 1.5)

#: Image size of the preprocessed files.
NYUV2_SIZE = (288, 384)
CITYSCAPES_SIZE = (128, 256)

_NUMBERED = re.compile(r"^(\d+)\.npy$")
#: Rounding allowed beyond [0, 1] in the images of scene 0.
_RANGE_SLACK = 1e-3
#: How far from 1 the lengths of scene 0's normals may be, in the median (stored normals are
#: unit to a few per cent; an RGB-encoded map's lengths spread over 0.37…1.37).
_NORMAL_NORM_SLACK = 0.05


class DatasetLayoutError(BenchmarkError):
    """A data directory that is missing or does not have the expected layout (a ValueError)."""


#: NYUv2's segmentation classes in MTAN's preprocessing.
NYUV2_CLASSES = 13
#: The other label value read as unlabelled beside -1 (Cityscapes' ignore value elsewhere).
UNLABELLED_255 = 255


def layout_text(dataset: str, num_classes: int = 7) -> str:
    """The expected directory tree of ``"nyuv2"`` or ``"cityscapes"``, for error messages.

    Args:
        dataset: ``"nyuv2"`` or ``"cityscapes"``.
        num_classes: Cityscapes' label set (7 or 19), which names its label folder.

    Returns:
        A few lines showing the tree.
    """
    if dataset == "nyuv2":
        height, width = NYUV2_SIZE
        folders = [
            ("image", f"{height}×{width}×3 float"),
            ("label", f"{height}×{width}, -1 = unlabelled"),
            ("depth", f"{height}×{width}×1, 0 = missing"),
            ("normal", f"{height}×{width}×3 unit vectors, 0 = missing"),
        ]
    else:
        height, width = CITYSCAPES_SIZE
        folders = [
            ("image", f"{height}×{width}×3 float"),
            (f"label_{num_classes}", f"{height}×{width}, -1 = unlabelled"),
            ("depth", f"{height}×{width}×1, 0 = missing"),
        ]
    lines = ["DATA_ROOT/"]
    for split in ("train", "val"):
        lines.append(f"  {split}/")
        lines += [f"    {name}/0.npy, 1.npy, ...   ({what})" for name, what in folders]
    return "\n".join(lines)


def _numbered_files(folder: Path) -> int:
    """How many files ``0.npy … (n−1).npy`` a folder holds; raises if numbering has gaps, or
    on a zero-padded name (``0001.npy``), which the papers' loaders (``'{:d}.npy'``) and this
    one would never open."""
    names = [
        (match.group(1), name)
        for match, name in ((_NUMBERED.match(p.name), p.name) for p in folder.iterdir())
        if match
    ]
    padded = sorted(name for digits, name in names if digits != str(int(digits)))
    if padded:
        raise DatasetLayoutError(
            f"{folder}: file names must be unpadded numbers, 0.npy, 1.npy, … (MTAN's "
            f"preprocessing writes them so, and its loaders read '{{:d}}.npy'); found "
            f"{padded[:5]}{' …' if len(padded) > 5 else ''}"
        )
    numbers = sorted(int(digits) for digits, _ in names)
    if numbers != list(range(len(numbers))):
        # The range the highest file implies: with 15 of 0 … 15 present, 16 files are meant
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:5]
        raise DatasetLayoutError(
            f"{folder}: files must be numbered 0.npy … {numbers[-1]}.npy without gaps; "
            f"missing {[f'{n}.npy' for n in missing]}"
        )
    return len(numbers)


def _check_split(root: Path, split: str, folders: Sequence[str], layout: str) -> int:
    """Check that ``root/split/<folder>/`` exist with the same numbered files; their count."""
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {str(root)!r} is not a directory; expected:\n{layout}")
    counts = {}
    for folder in folders:
        path = root / split / folder
        if not path.is_dir():
            raise DatasetLayoutError(
                f"{str(path)!r} is missing; the data root must look like:\n{layout}"
            )
        counts[folder] = _numbered_files(path)
    if len(set(counts.values())) != 1 or next(iter(counts.values())) == 0:
        raise DatasetLayoutError(
            f"{root / split}: every folder must hold the same number (≥ 1) of numbered .npy "
            f"files, found {counts}; expected:\n{layout}"
        )
    return next(iter(counts.values()))


def random_scale_crop(
    image: Tensor,
    label: Tensor,
    depth: Tensor,
    normal: Tensor | None = None,
    scales: Sequence[float] = SCALES,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """MTAN's random scale-crop: zoom into a random window by a random factor.

    Args:
        image: ``[3, H, W]``.
        label: ``[H, W]``.
        depth: ``[1, H, W]``.
        normal: ``[3, H, W]`` or None (Cityscapes).
        scales: the factors ``s`` drawn from, uniformly.

    Returns:
        The four tensors at the same size; depth divided by ``s`` (the scene looks ``s`` times
        nearer).

    Example:
        >>> import torch
        >>> image, label = torch.rand(3, 4, 6), torch.zeros(4, 6, dtype=torch.long)
        >>> out = random_scale_crop(image, label, torch.ones(1, 4, 6), scales=(2.0,))
        >>> tuple(out[0].shape), float(out[2].max())
        ((3, 4, 6), 0.5)
    """
    height, width = image.shape[-2:]
    scale = scales[int(torch.randint(len(scales), ()))]
    crop_h, crop_w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - crop_h + 1, ()))
    left = int(torch.randint(width - crop_w + 1, ()))
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    size = (height, width)

    def smooth(x: Tensor) -> Tensor:
        return functional.interpolate(
            x[None, :, window[0], window[1]], size=size, mode="bilinear", align_corners=True
        )[0]

    def nearest(x: Tensor) -> Tensor:
        return functional.interpolate(x[None, :, window[0], window[1]], size=size, mode="nearest")[
            0
        ]

    label_out = nearest(label[None].double())[0].to(label.dtype)
    normal_out = None if normal is None else smooth(normal)
    return smooth(image), label_out, nearest(depth) / scale, normal_out


def horizontal_flip(
    image: Tensor, label: Tensor, depth: Tensor, normal: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Mirror left–right; a mirrored normal has its x (first) channel negated.

    Example:
        >>> import torch
        >>> normal = torch.tensor([[[0.5, 0.0]], [[0.0, 0.0]], [[0.75, 1.0]]])
        >>> horizontal_flip(normal, normal[0, 0], normal[:1], normal)[3][:, 0, :].tolist()
        [[-0.0, -0.5], [0.0, 0.0], [1.0, 0.75]]
    """
    flipped = None
    if normal is not None:
        flipped = normal.flip(-1)
        flipped = torch.cat([-flipped[:1], flipped[1:]])
    return image.flip(-1), label.flip(-1), depth.flip(-1), flipped


class NpyDenseDataset(Dataset[tuple[Tensor, tuple[Tensor, ...]]]):
    """One split of NYUv2 or Cityscapes in the preprocessed ``.npy`` layout.

    Items are ``(image, (label, depth[, normal]))``: ``[3, H, W]`` float32, ``[H, W]`` int64,
    ``[1, H, W]`` float32 and ``[3, H, W]`` float32.

    Args:
        root: the data root (containing ``train/`` and ``val/``).
        split: ``"train"`` or ``"val"``.
        dataset: ``"nyuv2"`` (label, depth, normals) or ``"cityscapes"`` (label, depth).
        num_classes: Cityscapes' label set (7 or 19: folder ``label_7/`` or ``label_19/``).
        augment: apply the random scale-crop and flip (training split).
        indices: use only these scene numbers (a held-out validation subset).

    Raises:
        DatasetLayoutError: a missing folder, uneven, gapped or zero-padded numbering, scene
            0's arrays of the wrong shape, not numbers, or of the wrong values (images outside
            [0, 1], NaN or infinite values, negative depth, normals that are not unit vectors)
            (here); a file that cannot be read, or a scene whose arrays do not have scene 0's
            shapes (when the item is read, before augmentation). The message names the file
            and shows the expected tree.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        dataset: str = "nyuv2",
        num_classes: int = 7,
        augment: bool = False,
        indices: Sequence[int] | None = None,
    ) -> None:
        if dataset not in ("nyuv2", "cityscapes"):
            raise ValueError(f"dataset must be 'nyuv2' or 'cityscapes', got {dataset!r}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if dataset == "cityscapes" and num_classes not in (7, 19):
            raise ValueError(f"num_classes: expected 7 or 19 (Cityscapes), got {num_classes!r}")
        self.numpy: Any = require_module("numpy")
        self.root = Path(root)
        self.split = split
        self.dataset = dataset
        self.augment = augment
        self.num_classes = NYUV2_CLASSES if dataset == "nyuv2" else num_classes
        label_folder = "label" if dataset == "nyuv2" else f"label_{num_classes}"
        self.folders = ["image", label_folder, "depth"] + (["normal"] if dataset == "nyuv2" else [])
        self.layout = layout_text(dataset, num_classes)
        count = _check_split(self.root, split, self.folders, self.layout)
        self.indices = list(range(count)) if indices is None else list(indices)
        #: Each folder's array shape (scene 0's), which every scene must have.
        self.shapes = self._check_first_item()

    def _path(self, folder: str, number: int) -> Path:
        return self.root / self.split / folder / f"{number}.npy"

    def _load(self, folder: str, number: int) -> Tensor:
        path = self._path(folder, number)
        try:
            array = self.numpy.load(path)
        except (OSError, EOFError, ValueError) as error:  # truncated, empty, pickled, not .npy
            raise DatasetLayoutError(
                f"{path}: cannot be read as a .npy array ({type(error).__name__}: {error}); "
                f"expected numeric arrays, as:\n{self.layout}"
            ) from error
        # Strings, booleans or complex numbers would otherwise fail later in torch, unnamed.
        if array.dtype.kind not in "fiu":
            raise DatasetLayoutError(
                f"{path}: dtype {array.dtype}; expected float or integer arrays, as:\n{self.layout}"
            )
        return torch.from_numpy(array)

    def _check_first_item(self) -> dict[str, tuple[int, ...]]:
        """Check scene 0's arrays against each other (an early error); their shapes."""
        image, label, depth, *normal = (self._load(f, 0) for f in self.folders)
        height, width = label.shape[-2:] if label.dim() == 2 else (-1, -1)
        expected = {
            "image": (height, width, 3),
            self.folders[1]: (height, width),
            "depth": (height, width, 1),
            "normal": (height, width, 3),
        }
        channels = (
            "H×W×3 images, H×W labels, H×W×1 depth and H×W×3 normals"
            if self.dataset == "nyuv2"
            else "H×W×3 images, H×W labels and H×W×1 depth"
        )
        for folder, array in zip(self.folders, (image, label, depth, *normal), strict=True):
            if label.dim() != 2:
                raise DatasetLayoutError(
                    f"{self._path(self.folders[1], 0)}: shape {tuple(label.shape)}; expected "
                    f"{channels} (channel last), as:\n{self.layout}"
                )
            if tuple(array.shape) != expected[folder]:
                raise DatasetLayoutError(
                    f"{self._path(folder, 0)}: shape {tuple(array.shape)}; expected "
                    f"{expected[folder]}, from the H×W = {height}×{width} of "
                    f"{self.folders[1]}/0.npy ({channels}, channel last), as:\n{self.layout}"
                )
        # MTAN's images are floats in [0, 1]: 8-bit ones would reach the model as 0…255
        if not image.is_floating_point():
            raise DatasetLayoutError(
                f"{self._path('image', 0)}: dtype {image.dtype}; expected float images in "
                f"[0, 1] as MTAN's preprocessing writes them (divide 8-bit images by 255), "
                f"as:\n{self.layout}"
            )
        self._check_values(image, depth, normal[0] if normal else None)
        return {folder: expected[folder] for folder in self.folders}

    def _check_values(self, image: Tensor, depth: Tensor, normal: Tensor | None) -> None:
        """Scene 0's values: what a wrong encoding would otherwise train on silently (images
        in 0…255, normals stored as an RGB map ``(n + 1)/2``, NaN depth)."""
        for folder, array in (("image", image), ("depth", depth), ("normal", normal)):
            if array is not None and not bool(torch.isfinite(array).all()):
                raise DatasetLayoutError(
                    f"{self._path(folder, 0)}: NaN or infinite values; expected finite "
                    f"numbers (0 marks a missing depth or normal), as:\n{self.layout}"
                )
        low, high = float(image.min()), float(image.max())
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise DatasetLayoutError(
                f"{self._path('image', 0)}: values in [{low:g}, {high:g}]; expected floats in "
                f"[0, 1] as MTAN's preprocessing writes them (divide 0…255 values by 255; "
                f"undo any mean/std normalisation), as:\n{self.layout}"
            )
        if float(depth.min()) < 0:
            raise DatasetLayoutError(
                f"{self._path('depth', 0)}: negative depth {float(depth.min()):g}; expected "
                f"depth ≥ 0 (0 where missing), as:\n{self.layout}"
            )
        if normal is None:
            return
        vectors = normal.reshape(-1, 3).double()
        vectors = vectors[(vectors != 0).any(dim=1)]
        if not len(vectors):
            return
        lengths = vectors.norm(dim=1)
        if float((lengths - 1).abs().median()) > _NORMAL_NORM_SLACK:
            hint = (
                "every component is ≥ 0, as in an RGB normal map (n + 1)/2: store 2·x − 1"
                if bool((vectors >= 0).all())
                else "normalise them"
            )
            raise DatasetLayoutError(
                f"{self._path('normal', 0)}: normals of lengths {float(lengths.min()):.3g} … "
                f"{float(lengths.max()):.3g}, median {float(lengths.median()):.3g} ({hint}); "
                f"expected unit vectors with components in [-1, 1] (0 where missing), as the "
                f"papers' normal metrics and loss assume, as:\n{self.layout}"
            )

    def _check_item(self, number: int, arrays: Sequence[Tensor]) -> None:
        """Every scene must have scene 0's shapes: the scale-crop would silently stretch a
        truncated array back to size, and batching fails on one, naming no file. Shape
        comparisons only (reading every file up front would cost an epoch's worth of I/O)."""
        for folder, array in zip(self.folders, arrays, strict=True):
            if tuple(array.shape) != self.shapes[folder]:
                raise DatasetLayoutError(
                    f"{self._path(folder, number)}: shape {tuple(array.shape)}; expected "
                    f"{self.shapes[folder]}, the shape of {folder}/0.npy (every scene of a "
                    f"split has the same size, channel last), as:\n{self.layout}"
                )

    def _check_label_values(self, number: int, label: Tensor) -> None:
        """Labels are classes ``0 … C−1``, or ``−1``/``255`` for unlabelled pixels. Any other
        value would be read as unlabelled too, silently: classes numbered from 1, or 19-class
        labels in ``label_7/``, would train on the wrong classes."""
        outside = (label >= self.num_classes) & (label != UNLABELLED_255)
        outside |= label < -1
        if bool(outside.any()):
            value = int(label[outside][0])
            raise DatasetLayoutError(
                f"{self._path(self.folders[1], number)}: label {value}; expected classes "
                f"0 … {self.num_classes - 1}, or -1 or 255 for unlabelled pixels (classes "
                f"numbered from 1, or labels of another class set?), as:\n{self.layout}"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        number = self.indices[index]
        arrays = [self._load(folder, number) for folder in self.folders]
        self._check_item(number, arrays)
        image = arrays[0].permute(2, 0, 1).float()
        label = arrays[1].round().long()
        self._check_label_values(number, label)
        depth = arrays[2].permute(2, 0, 1).float()
        normal = arrays[3].permute(2, 0, 1).float() if len(arrays) == 4 else None
        if self.augment:
            image, label, depth, normal = random_scale_crop(image, label, depth, normal)
            if bool(torch.rand(()) < 0.5):
                image, label, depth, normal = horizontal_flip(image, label, depth, normal)
        targets = (label, depth) if normal is None else (label, depth, normal)
        return image, targets


def dense_splits(
    root: str | Path,
    dataset: str,
    num_classes: int = 7,
    augment: bool = True,
    val_size: int = 0,
    data_seed: int = 0,
) -> tuple[NpyDenseDataset, NpyDenseDataset, NpyDenseDataset]:
    """The papers' train / validation / test splits of NYUv2 or Cityscapes.

    Args:
        root: the data root.
        dataset: ``"nyuv2"`` or ``"cityscapes"``.
        num_classes: Cityscapes' label set (7 or 19).
        augment: augment the training split (scale-crop and flip).
        val_size: 0: validation is ``val/`` (the papers); n > 0: n training scenes held out
            (chosen by ``data_seed``, not augmented).
        data_seed: seed of the held-out subset.

    Returns:
        ``(train, validation, test)``; test is always ``val/``.

    Raises:
        DatasetLayoutError: see :class:`NpyDenseDataset`.
        ValueError: ``val_size`` negative or not below the training size.
    """
    train = NpyDenseDataset(root, "train", dataset, num_classes, augment=augment)
    test = NpyDenseDataset(root, "val", dataset, num_classes)
    if val_size == 0:
        return train, test, test
    if not 0 < val_size < len(train):
        raise ValueError(f"val_size must be in [0, {len(train)}), got {val_size!r}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(data_seed)).tolist()
    held_out, kept = order[:val_size], order[val_size:]
    train = NpyDenseDataset(root, "train", dataset, num_classes, augment=augment, indices=kept)
    validation = NpyDenseDataset(root, "train", dataset, num_classes, indices=held_out)
    return train, validation, test


# ---------------------------------------------------------------------------------------------
# The benchmarks (``--bench nyuv2|cityscapes --data-root DIR``).

#: Nash-MTL's NYUv2 settings: 200 epochs, batch 2, Adam 1e-4, halved at 100; its test loader
#: takes the training batch size, which sets the batches its depth and normal errors average
#: over (:data:`METRIC_REDUCTION`), so the evaluation batch is left to follow it.
NYUV2_DEFAULTS = TrainingDefaults(
    epochs=200,
    batch_size=2,
    lr=1e-4,
    schedule="step",
    step_epochs=100,
    gamma=0.5,
)
#: How depth and normal errors are averaged: per test batch, then over the batches, as MTAN's,
#: CAGrad's, Nash-MTL's and FAMO's trainers do (LibMTL averages over every valid pixel).
METRIC_REDUCTION: Reduction = "batch"
#: Nash-MTL's Cityscapes settings: as NYUv2 with batch 8.
CITYSCAPES_DEFAULTS = replace(NYUV2_DEFAULTS, batch_size=8)
#: ``--small``: the first few scenes of each split, a CPU-sized model, 1 epoch (smoke tests).
SMALL_SCENES = 8
#: The model of the published NYUv2 / Cityscapes tables: MTAN's attention network, the default
#: ``--model`` of Nash-MTL's trainers (``experiments/nyuv2/trainer.py``; FAMO's Cityscapes
#: trainer likewise), on which CAGrad, Nash-MTL and FAMO report.
DEFAULT_MODEL = "mtan"


def _dense_benchmark(
    dataset: str,
    data_root: str | None,
    small: bool,
    data_seed: int,
    num_classes: int,
    model: str,
) -> Benchmark:
    model = check_dense_model(model)
    if data_root is None:
        raise DatasetLayoutError(
            f"--bench {dataset} reads your files: pass --data-root DIR with\n"
            f"{layout_text(dataset, num_classes)}"
        )
    normals = dataset == "nyuv2"
    train, validation, test = dense_splits(data_root, dataset, num_classes, data_seed=data_seed)
    if small:
        for split in {id(s): s for s in (train, validation, test)}.values():
            split.indices = split.indices[:SMALL_SCENES]
    filters = CPU_FILTERS if small else PAPER_FILTERS
    _check_divisible(train, test, filters)
    out_channels = (num_classes, 1, 3) if normals else (num_classes, 1)

    def build_model() -> nn.Module:
        units = (False, False, True)[: len(out_channels)]
        return dense_model(model, out_channels, units, filters)

    defaults = NYUV2_DEFAULTS if normals else CITYSCAPES_DEFAULTS
    if small:
        defaults = replace(defaults, epochs=1)
    return Benchmark(
        name=dataset,
        tasks=dense_tasks(num_classes, normals=normals, reduction=METRIC_REDUCTION),
        train=train,
        validation=validation,
        test=test,
        model=build_model,
        defaults=defaults,
        description=NYUV2_DESCRIPTION if normals else _cityscapes_description(num_classes),
        settings={
            "data_root": str(Path(data_root).resolve()),
            "small": small,
            "data_seed": data_seed,
            "num_classes": num_classes,
            "train_scenes": len(train),
            "test_scenes": len(test),
            "augment": True,
            "metric_reduction": METRIC_REDUCTION,
            "model": model,
            "filters": list(filters),
        },
    )


def _check_divisible(train: NpyDenseDataset, test: NpyDenseDataset, filters: Sequence[int]) -> None:
    """The encoder halves H and W once per level: refuse, before any training, a size the
    model would reject at its first forward (``--small``'s model has fewer levels than the
    papers', so a size it accepts may still fail the full run: that is named too)."""
    factor, full = 2 ** len(filters), 2 ** len(PAPER_FILTERS)
    for split in (train, test):
        height, width, _ = split.shapes["image"]
        if height % factor or width % factor:
            raise DatasetLayoutError(
                f"{split.root / split.split / 'image'}: images of {height}×{width}; the model "
                f"({len(filters)} levels) needs H and W divisible by {factor} (by {full} at "
                f"the papers' size, without --small), as:\n{split.layout}"
            )


NYUV2_DESCRIPTION = (
    "NYUv2 (your .npy files): 13-class segmentation, depth, normals; MTAN (--model segnet: "
    "split SegNet)"
)
CITYSCAPES_DESCRIPTION = (
    "Cityscapes (your .npy files): 7-class segmentation (19 from label_19/), depth; MTAN "
    "(--model segnet: split SegNet)"
)


def cityscapes_classes(data_root: str | Path | None) -> int:
    """The label set a Cityscapes data root offers: 7 (``label_7/``) unless only ``label_19/``.

    The command line has no class option, so the folders decide; 7 when both exist, the set of
    the published tables (MTAN, Nash-MTL, FAMO), and when neither does (the error then names
    ``label_7/``).

    Args:
        data_root: the directory with ``train/`` and ``val/``, or None.

    Returns:
        7 or 19.
    """
    if data_root is None:
        return 7
    train = Path(data_root) / "train"
    return 19 if (train / "label_19").is_dir() and not (train / "label_7").is_dir() else 7


def _cityscapes_description(num_classes: int) -> str:
    """The built benchmark's one line, with the label set it reads."""
    return (
        f"Cityscapes (your .npy files): {num_classes}-class segmentation, depth; MTAN "
        "(--model segnet: split SegNet)"
    )


def build_nyuv2(
    data_root: str | None = None,
    small: bool = False,
    data_seed: int = 0,
    model: str = DEFAULT_MODEL,
) -> Benchmark:
    """Build ``nyuv2`` from MTAN's preprocessed files (795 train, 654 test scenes, 288×384).

    Model: by default MTAN's attention network on SegNet
    (:class:`~taskbalance.bench.mtan.SegNetMTAN`, 44.2 M parameters), the model of the
    published tables (CAGrad, Nash-MTL, FAMO; Nash-MTL's trainer defaults to it); ``"segnet"``
    is MTAN's split SegNet (:func:`~taskbalance.bench.segnet.segnet_model`, 25 M), both at
    :data:`~taskbalance.bench.segnet.PAPER_FILTERS`. The run's ``settings`` record ``model``.
    Gradient methods run on MTAN in parameters mode over its shared parameters (``trunk``).
    Training: Nash-MTL's settings (:data:`NYUV2_DEFAULTS`), augmentation on; evaluation as
    its trainer: depth and normal errors averaged per test batch of the training batch size
    (:data:`METRIC_REDUCTION`, recorded as ``metric_reduction``). Compare with the published
    tables using ``--select mean-last-10`` (Nash-MTL, FAMO) or ``--select last``.

    Args:
        data_root: the directory with ``train/`` and ``val/`` (see :func:`layout_text`).
        small: the first 8 scenes per split, the CPU-sized model and 1 epoch (smoke tests).
        data_seed: seed of a held-out validation subset (unused with the papers' splits).
        model: ``"mtan"`` (default) or ``"segnet"`` (``--model``).

    Returns:
        The benchmark.

    Raises:
        DatasetLayoutError: no ``data_root``, or a directory without the expected layout.
        BenchmarkError: an unknown ``model``.

    Example:
        >>> try:
        ...     build_nyuv2(model="resnet")
        ... except BenchmarkError as error:
        ...     print(error)
        model (--model): expected one of ['segnet', 'mtan'], got 'resnet'
    """
    return _dense_benchmark("nyuv2", data_root, small, data_seed, NYUV2_CLASSES, model)


def build_cityscapes(
    data_root: str | None = None,
    small: bool = False,
    data_seed: int = 0,
    model: str = DEFAULT_MODEL,
    num_classes: int | None = None,
) -> Benchmark:
    """Build ``cityscapes`` from MTAN's preprocessed files (2975 / 500 scenes, 128×256).

    Model: by default MTAN with two tasks (FAMO's and Nash-MTL's Cityscapes trainers default to
    it), or ``model="segnet"``; training: Nash-MTL's settings (:data:`CITYSCAPES_DEFAULTS`),
    augmentation on. Classes: 7 (``label_7/``, the published tables) or 19 (``label_19/``);
    ``--bench cityscapes`` passes no ``num_classes``, so the folders decide
    (:func:`cityscapes_classes`: 19 only when ``label_7/`` is absent). The run's ``settings``
    record ``num_classes``.

    Args:
        data_root: the directory with ``train/`` and ``val/`` (see :func:`layout_text`).
        small: the first 8 scenes per split, the CPU-sized model and 1 epoch (smoke tests).
        data_seed: seed of a held-out validation subset (unused with the papers' splits).
        model: ``"mtan"`` (default) or ``"segnet"`` (``--model``).
        num_classes: 7 or 19, reading ``label_7/`` or ``label_19/``; None: as the folders say.

    Returns:
        The benchmark.

    Raises:
        DatasetLayoutError: no ``data_root``, or a directory without the expected layout.
        BenchmarkError: an unknown ``model``.
        ValueError: ``num_classes`` other than 7, 19 or None.
    """
    if num_classes is None:
        num_classes = cityscapes_classes(data_root)
    elif num_classes not in (7, 19):
        raise ValueError(f"num_classes: expected 7 or 19 (Cityscapes), got {num_classes!r}")
    return _dense_benchmark("cityscapes", data_root, small, data_seed, num_classes, model)


register_benchmark(
    "nyuv2",
    build_nyuv2,
    description=NYUV2_DESCRIPTION,
    tasks=(
        "segmentation: cross-entropy; mIoU ↑, pixel acc ↑",
        "depth: L1; abs err ↓, rel err ↓",
        "normal: 1 − cos; mean ↓, median ↓, within 11.25° ↑ 22.5° ↑ 30° ↑",
    ),
    needs_data_root=True,
)
register_benchmark(
    "cityscapes",
    build_cityscapes,
    description=CITYSCAPES_DESCRIPTION,
    tasks=("segmentation: cross-entropy; mIoU ↑, pixel acc ↑", "depth: L1; abs err ↓, rel err ↓"),
    needs_data_root=True,
)
