"""CelebA's 40 binary face attributes, in the official layout, with FAMO's network.

Liu, Luo, Wang, Tang, ICCV 2015, "Deep Learning Face Attributes in the Wild": 202,599 aligned
face images with 40 binary attributes, split by ``list_eval_partition.txt`` into 162,770
training, 19,867 validation and 19,962 test images. The multi-task protocol is FAMO's (Liu et
al., NeurIPS 2023; also Nash-MTL-style comparisons): one task per attribute, images resized to
64×64 (``Resize((64, 64))`` then ``[0, 1]`` floats, no augmentation), a 9-layer
convolutional trunk with 40 linear heads, binary cross-entropy, 15 epochs of Adam at 3e-4 with
batch 256, and the F1 score of each attribute (:class:`taskbalance.metrics.BinaryF1`), the
model chosen on the validation split's mean F1.

The files are the user's; either the official folder structure or a flat one (torchvision's)
is read::

    DATA_ROOT/                               DATA_ROOT/
      Img/img_align_celeba/000001.jpg …        img_align_celeba/000001.jpg …
      Anno/list_attr_celeba.txt         or     list_attr_celeba.txt
      Eval/list_eval_partition.txt             list_eval_partition.txt

``list_attr_celeba.txt``: a count line, a line with the 40 attribute names, then one line per
image ``name v₁ … v₄₀`` with ``1`` / ``-1``. ``list_eval_partition.txt``: ``name split`` with
split 0 (train), 1 (validation), 2 (test), in the same image order.

Departures: the heads return logits (FAMO's return sigmoid probabilities for ``BCELoss``);
the loss and the 0.5-probability threshold are the same.

Example:
    >>> trunk, heads = celeba_model(num_attributes=3)
    >>> len(heads), heads[0].in_features
    (3, 512)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from taskbalance.bench.api import (
    Benchmark,
    Task,
    TrainingDefaults,
    binary_kpi,
    register_benchmark,
    require_module,
)
from taskbalance.bench.dense import FieldMetrics
from taskbalance.bench.losses import binary_cross_entropy
from taskbalance.bench.real_datasets import DatasetLayoutError
from taskbalance.metrics import BinaryF1

#: The image size of FAMO's CelebA protocol.
IMAGE_SIZE = (64, 64)

#: Split codes of ``list_eval_partition.txt``.
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

NUM_ATTRIBUTES = 40

LAYOUT = """DATA_ROOT/  (official layout)          or  DATA_ROOT/  (flat, as torchvision)
  Img/img_align_celeba/000001.jpg ...          img_align_celeba/000001.jpg ...
  Anno/list_attr_celeba.txt                    list_attr_celeba.txt
  Eval/list_eval_partition.txt                 list_eval_partition.txt
(torchvision's own root, whose celeba/ folder holds the flat layout, is read too)"""


def _find(root: Path, candidates: tuple[str, ...], is_dir: bool) -> Path:
    for candidate in candidates:
        path = root / candidate
        if path.is_dir() if is_dir else path.is_file():
            return path
    raise DatasetLayoutError(
        f"{str(root)!r}: none of {list(candidates)} exists; the CelebA root must look like:\n"
        f"{LAYOUT}"
    )


def read_celeba_lists(root: str | Path) -> tuple[Path, list[str], list[str], Tensor, Tensor]:
    """Parse the attribute and partition lists.

    Args:
        root: the CelebA data root.

    Returns:
        ``(image folder, attribute names, image names, labels [N, 40] in {0, 1}, split codes
        [N])``.

    Raises:
        DatasetLayoutError: a missing file or folder, or lists that do not parse or disagree.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {str(root)!r} is not a directory; expected:\n{LAYOUT}")
    unpacked_here = any((root / name).exists() for name in ("Img", "img_align_celeba"))
    if not unpacked_here and (root / "celeba").is_dir():
        root = root / "celeba"  # torchvision.datasets.CelebA(root) keeps the flat layout there
    images = _find(root, ("Img/img_align_celeba", "img_align_celeba"), is_dir=True)
    attr_file = _find(root, ("Anno/list_attr_celeba.txt", "list_attr_celeba.txt"), is_dir=False)
    split_file = _find(
        root, ("Eval/list_eval_partition.txt", "list_eval_partition.txt"), is_dir=False
    )
    lines = attr_file.read_text().split("\n")
    rows = [line.split() for line in lines[2:] if line.strip()]
    attributes = lines[1].split() if len(lines) > 1 else []
    if len(attributes) != NUM_ATTRIBUTES or not rows or any(len(r) != 41 for r in rows):
        raise DatasetLayoutError(
            f"{attr_file}: expected a count line, a line of 40 attribute names, then lines "
            "'name v1 ... v40' of 1/-1"
        )
    try:
        values = torch.tensor([[int(v) for v in row[1:]] for row in rows])
        partition = [line.split() for line in split_file.read_text().split("\n") if line.strip()]
        codes = torch.tensor([int(code) for _, code in partition])
    except ValueError as error:
        raise DatasetLayoutError(
            f"CelebA lists under {str(root)!r} do not parse: {error}"
        ) from None
    names = [row[0] for row in rows]
    if [name for name, _ in partition] != names:
        raise DatasetLayoutError(
            f"{split_file} and {attr_file} must list the same images in the same order"
        )
    if not bool(((values == 1) | (values == -1)).all()):
        raise DatasetLayoutError(f"{attr_file}: attribute values must be 1 or -1")
    return images, attributes, names, (values == 1).float(), codes


class CelebADataset(Dataset[tuple[Tensor, tuple[Tensor, ...]]]):
    """One split of CelebA: ``(image [3, 64, 64] in [0, 1], (attribute₁ [1], …, attribute₄₀))``.

    Args:
        root: the CelebA data root (official or flat layout).
        split: ``"train"``, ``"val"`` or ``"test"`` (``list_eval_partition.txt`` codes 0, 1, 2).
        image_size: the resize target ``(height, width)``.
        limit: use only the first ``limit`` images of the split (smoke tests).

    Raises:
        DatasetLayoutError: see :func:`read_celeba_lists`; also an empty split.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        image_size: tuple[int, int] = IMAGE_SIZE,
        limit: int | None = None,
    ) -> None:
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {list(SPLIT_CODES)}, got {split!r}")
        self.image_module: Any = require_module("PIL.Image")
        folder, self.attributes, names, labels, codes = read_celeba_lists(root)
        chosen = (codes == SPLIT_CODES[split]).nonzero().flatten().tolist()
        if limit is not None:
            chosen = chosen[:limit]
        if not chosen:
            raise DatasetLayoutError(f"CelebA under {str(root)!r} has no {split!r} images")
        self.folder = folder
        self.names = [names[i] for i in chosen]
        self.labels = labels[chosen]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        path = self.folder / self.names[index]
        if not path.is_file():
            raise DatasetLayoutError(f"CelebA image {str(path)!r} is missing; expected:\n{LAYOUT}")
        with self.image_module.open(path) as image:
            height, width = self.image_size
            resized = image.convert("RGB").resize((width, height), self.image_module.BILINEAR)
            pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
        tensor = pixels.reshape(height, width, 3).permute(2, 0, 1).float() / 255.0
        row = self.labels[index]
        return tensor, tuple(row[k : k + 1] for k in range(row.numel()))


def _conv(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def celeba_model(
    num_attributes: int = NUM_ATTRIBUTES, width: int = 64
) -> tuple[nn.Sequential, list[nn.Linear]]:
    """FAMO's CelebA network: a 7-convolution trunk, two 512-unit layers, one linear head each.

    ``conv64 → pool → conv128 ×2 → pool → conv256 ×2 → pool → conv512 ×2 → global average
    pool → (Linear 512 → BN → ReLU) ×2``, every convolution 3×3 without bias followed by
    BatchNorm and ReLU; each head is ``Linear(512, 1)`` returning a logit.

    Args:
        num_attributes: number of heads.
        width: channels of the first convolution (64 in FAMO; the rest scale with it).

    Returns:
        ``(trunk, heads)``: the trunk maps ``[N, 3, H, W]`` to ``[N, 8·width]`` features.
    """
    w = width
    trunk = nn.Sequential(
        *_conv(3, w),
        nn.MaxPool2d(2),
        *_conv(w, 2 * w),
        *_conv(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *_conv(2 * w, 4 * w),
        *_conv(4 * w, 4 * w),
        nn.MaxPool2d(2),
        *_conv(4 * w, 8 * w),
        *_conv(8 * w, 8 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, 8 * w, bias=False),
        nn.BatchNorm1d(8 * w),
        nn.ReLU(inplace=True),
        nn.Linear(8 * w, 8 * w, bias=False),
        nn.BatchNorm1d(8 * w),
        nn.ReLU(inplace=True),
    )
    heads = [nn.Linear(8 * w, 1) for _ in range(num_attributes)]
    return trunk, heads


# ---------------------------------------------------------------------------------------------
# The benchmark (``--bench celeba --data-root DIR``).

#: FAMO's CelebA settings: 15 epochs of Adam at 3e-4, batch 256, constant rate.
DEFAULTS = TrainingDefaults(epochs=15, batch_size=256, lr=3e-4, schedule="constant")
#: ``--small``: images per split, and the trunk's first width (smoke tests).
SMALL_IMAGES, SMALL_WIDTH = 64, 8
DESCRIPTION = "CelebA (your files): 40 binary face attributes at 64×64; FAMO's CNN; F1"


def build(data_root: str | None = None, small: bool = False) -> Benchmark:
    """Build ``celeba``: one task per attribute, FAMO's protocol.

    Every task is binary cross-entropy on a logit with the split's F1 as metric; Δm% averages
    the 40 F1 scores' relative changes. FAMO selects the epoch of best validation mean F1:
    ``--select best-val-mean`` (``best-val`` scores each F1's change relative to the
    single-task model's, which weighs a rare attribute's F1 more and can pick another epoch).

    Args:
        data_root: the CelebA directory (official or flat layout, see :data:`LAYOUT`).
        small: 64 images per split, a narrow trunk and 1 epoch (smoke tests).

    Returns:
        The benchmark.

    Raises:
        DatasetLayoutError: no ``data_root``, or a directory without the expected layout.
    """
    if data_root is None:
        raise DatasetLayoutError(
            f"--bench celeba reads your files: pass --data-root DIR with\n{LAYOUT}"
        )
    limit = SMALL_IMAGES if small else None
    train, validation, test = (
        CelebADataset(data_root, split, limit=limit) for split in ("train", "val", "test")
    )
    width = SMALL_WIDTH if small else 64
    tasks = tuple(
        Task(
            name,
            binary_cross_entropy,
            (FieldMetrics([BinaryF1()]),),
            kind="classification",
            kpi=binary_kpi,
            description=f"attribute {name} (binary cross-entropy; F1)",
        )
        for name in train.attributes
    )
    return Benchmark(
        name="celeba",
        tasks=tasks,
        train=train,
        validation=validation,
        test=test,
        model=lambda: celeba_model(len(tasks), width),
        defaults=replace(DEFAULTS, epochs=1) if small else DEFAULTS,
        description=DESCRIPTION,
        settings={
            "data_root": str(Path(data_root).resolve()),
            "small": small,
            "images": [len(train), len(validation), len(test)],
            "image_size": list(IMAGE_SIZE),
            "width": width,
        },
    )


register_benchmark(
    "celeba",
    build,
    description=DESCRIPTION,
    tasks=("40 attributes: binary cross-entropy; F1 ↑ each",),
    needs_data_root=True,
)
