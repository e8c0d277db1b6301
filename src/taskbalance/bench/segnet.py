"""SegNet-style encoder–decoder with per-task dense heads, as in the MTAN / Nash-MTL benchmarks.

Badrinarayanan, Kendall, Cipolla, TPAMI 2017, "SegNet: A Deep Convolutional Encoder-Decoder
Architecture for Image Segmentation", in the multi-task form of Liu, Johns, Davison, CVPR 2019,
"End-to-End Multi-Task Learning with Attention" (MTAN's ``SegNet`` split model, the backbone of
the NYUv2 and Cityscapes tables of MTAN, CAGrad, Nash-MTL, FAMO and LibMTL):

- every convolution is ``Conv 3×3 (padding 1) → BatchNorm → ReLU``;
- encoder level ``l`` maps to ``filters[l]`` channels with 2 convolutions on the first two levels
  and 3 on the others (VGG-16's 2-2-3-3-3), then a 2×2 max-pool that keeps its indices;
- the decoder mirrors it: max-unpool with the stored indices, then the same number of
  convolutions down to ``filters[l − 1]`` channels; the last level returns ``filters[0]``
  channels at the input resolution: the **shared features** a gradient method differentiates;
- each task head is ``Conv 3×3 (filters[0] → filters[0]) → Conv 1×1 (→ output channels)`` with
  no activation; a surface-normal head divides by the L2 norm over channels.

The papers' size is ``filters=(64, 128, 256, 512, 512)`` (about 25 M parameters, NYUv2 at
288×384); :data:`CPU_FILTERS` is a three-level, 8/16/32-channel version for the bundled
``scenes`` benchmark on a laptop CPU. Input height and width must be divisible by
``2 ** len(filters)``. MTAN's attention network on this SegNet, the model of the published
tables, is :mod:`taskbalance.bench.mtan`.

Departures: the segmentation head returns logits (MTAN returns ``log_softmax``; the
cross-entropy and the arg-max are the same). The normal head divides by ``max(‖x‖, 1e-12)``,
not ``‖x‖``, so a zero output gives zeros rather than NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn import functional

from taskbalance.bench.models import MultiTaskModel

#: MTAN's SegNet widths, the size of the published NYUv2 / Cityscapes tables.
PAPER_FILTERS = (64, 128, 256, 512, 512)

#: A CPU-sized SegNet for the bundled ``scenes`` benchmark.
CPU_FILTERS = (8, 16, 32)


def conv_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    """``Conv 3×3 (padding 1) → BatchNorm → ReLU``, SegNet's unit."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def check_image_size(images: Tensor, levels: int, model: str) -> None:
    """Refuse anything but ``[N, C, H, W]`` images with H and W divisible by ``2 ** levels``.

    Args:
        images: the input batch.
        levels: pooling levels of the network (``len(filters)``).
        model: the network's name, for the message.

    Raises:
        ValueError: naming the shape and the divisor.

    Example:
        >>> import torch
        >>> check_image_size(torch.zeros(1, 3, 8, 16), 3, "SegNetTrunk")
    """
    factor = 2**levels
    if images.dim() != 4 or images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(
            f"{model} expects [N, C, H, W] images with H and W divisible by {factor}, "
            f"got shape {tuple(images.shape)}"
        )


def _convs(in_channels: int, out_channels: int, count: int) -> nn.Sequential:
    layers = [conv_layer(in_channels, out_channels)]
    layers += [conv_layer(out_channels, out_channels) for _ in range(count - 1)]
    return nn.Sequential(*layers)


class SegNetTrunk(nn.Module):
    """The shared SegNet encoder–decoder: images ``[N, C, H, W]`` → features ``[N, F₀, H, W]``.

    Args:
        in_channels: input channels (3 for RGB).
        filters: channels of each level, e.g. :data:`PAPER_FILTERS` or :data:`CPU_FILTERS`.

    Example:
        >>> import torch
        >>> trunk = SegNetTrunk(3, (4, 8))
        >>> tuple(trunk(torch.zeros(2, 3, 8, 12)).shape)
        (2, 4, 8, 12)
    """

    def __init__(self, in_channels: int = 3, filters: Sequence[int] = PAPER_FILTERS) -> None:
        super().__init__()
        filters = tuple(filters)
        if not filters or any(
            isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in filters
        ):
            raise ValueError(
                f"filters must be a non-empty sequence of positive ints, got {filters}"
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        self.filters = filters
        previous = (in_channels, *filters[:-1])
        # VGG-16's 2-2-3-3-3 convolutions per level, as MTAN's SegNet.
        counts = [2 if level < 2 else 3 for level in range(len(filters))]
        self.encoder = nn.ModuleList(
            _convs(previous[level], filters[level], counts[level]) for level in range(len(filters))
        )
        self.decoder = nn.ModuleList(
            nn.Sequential(
                conv_layer(filters[level], filters[max(level - 1, 0)]),
                _convs(filters[max(level - 1, 0)], filters[max(level - 1, 0)], counts[level] - 1),
            )
            for level in range(len(filters))
        )

    def forward(self, images: Tensor) -> Tensor:
        """Shared features at the input resolution.

        Args:
            images: ``[N, in_channels, H, W]``, H and W divisible by ``2 ** len(filters)``.

        Returns:
            ``[N, filters[0], H, W]``.
        """
        check_image_size(images, len(self.filters), "SegNetTrunk")
        indices: list[Tensor] = []
        x = images
        for block in self.encoder:
            x, index = functional.max_pool2d(block(x), 2, 2, return_indices=True)
            indices.append(index)
        for level in reversed(range(len(self.filters))):
            x = functional.max_unpool2d(x, indices[level], (2, 2), (2, 2))
            x = self.decoder[level](x)
        return x


class DenseHead(nn.Module):
    """A task head: ``Conv 3×3 → Conv 1×1``, optionally L2-normalised over channels.

    Args:
        features: channels of the shared features.
        out_channels: the task's output channels (classes, 1 for depth, 3 for normals).
        unit: divide the output by its L2 norm over channels (surface normals).

    Example:
        >>> import torch
        >>> head = DenseHead(4, 3, unit=True)
        >>> out = head(torch.randn(1, 4, 2, 2))
        >>> bool(torch.allclose(out.norm(dim=1), torch.ones(1, 2, 2)))
        True
    """

    def __init__(self, features: int, out_channels: int, unit: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.out = nn.Conv2d(features, out_channels, kernel_size=1)
        self.unit = unit

    def forward(self, features: Tensor) -> Tensor:
        """The task's prediction, ``[N, out_channels, H, W]``."""
        output = self.out(self.conv(features))
        if self.unit:
            output = functional.normalize(output, dim=1, eps=1e-12)
        return output


def task_outputs(
    out_channels: Sequence[int], unit_outputs: Sequence[bool] | None, model: str
) -> tuple[list[int], list[bool]]:
    """Each task's output channels and whether its output is L2-normalised, checked.

    Raises:
        ValueError: no task, or ``unit_outputs`` of another length (the message names ``model``).

    Example:
        >>> task_outputs((13, 1, 3), None, "segnet_model")
        ([13, 1, 3], [False, False, False])
    """
    channels = list(out_channels)
    units = [False] * len(channels) if unit_outputs is None else list(unit_outputs)
    if not channels or len(units) != len(channels):
        raise ValueError(
            f"{model}: out_channels must be non-empty and unit_outputs of the same length, "
            f"got {len(channels)} and {len(units)}"
        )
    return channels, units


def segnet_model(
    out_channels: Sequence[int],
    unit_outputs: Sequence[bool] | None = None,
    filters: Sequence[int] = PAPER_FILTERS,
    in_channels: int = 3,
) -> MultiTaskModel:
    """A SegNet trunk with one dense head per task (MTAN's "split" multi-task SegNet).

    Args:
        out_channels: each task's output channels, e.g. ``(13, 1, 3)`` for NYUv2's
            segmentation, depth and normals.
        unit_outputs: per task, whether its output is L2-normalised (normals); default none.
        filters: the trunk's channels per level (:data:`PAPER_FILTERS`, :data:`CPU_FILTERS`).
        in_channels: input channels.

    Returns:
        A :class:`~taskbalance.bench.models.MultiTaskModel` whose ``forward`` returns the shared
        features and the list of head outputs.

    Example:
        >>> import torch
        >>> model = segnet_model((13, 1, 3), (False, False, True), filters=(4, 8))
        >>> features, (seg, depth, normal) = model(torch.zeros(1, 3, 8, 8))
        >>> tuple(seg.shape), tuple(depth.shape), tuple(normal.shape)
        ((1, 13, 8, 8), (1, 1, 8, 8), (1, 3, 8, 8))
    """
    out_channels, units = task_outputs(out_channels, unit_outputs, "segnet_model")
    trunk = SegNetTrunk(in_channels, filters)
    heads = [
        DenseHead(trunk.filters[0], channels, unit)
        for channels, unit in zip(out_channels, units, strict=True)
    ]
    return MultiTaskModel(trunk, heads)
