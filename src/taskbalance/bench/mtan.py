"""MTAN's attention network on SegNet ("SegNet-MTAN"), the model of the published dense tables.

Liu, Johns, Davison, CVPR 2019, "End-to-End Multi-Task Learning with Attention" (reference code
``lorenmt/mtan``, ``im2im_pred/model_segnet_mtan.py``; the same network is Nash-MTL's
``experiments/nyuv2/models.py`` ``SegNetMtan``, reused by FAMO, and CAGrad's
``nyuv2/model_segnet_mt.py``): the model of the NYUv2 and Cityscapes tables of CAGrad, Nash-MTL
and FAMO. It has

- a **shared network** (:class:`MTANTrunk`): the SegNet encoder–decoder of
  :class:`~taskbalance.bench.segnet.SegNetTrunk` (same levels and convolutions), plus one shared
  ``Conv 3×3 → BN → ReLU`` per encoder level and per decoder level (MTAN's
  ``encoder_block_att`` / ``decoder_block_att``) that carries an attended feature to the next
  level;
- per task (:class:`TaskAttention`), one **attention module** per encoder level and per decoder
  level, ``Conv 1×1 → BN → ReLU → Conv 1×1 → BN → Sigmoid``: a mask in (0, 1) with the channels
  of the shared map it gates; and the split SegNet's head
  (:class:`~taskbalance.bench.segnet.DenseHead`, ``Conv 3×3 → Conv 1×1``) on the last attended
  map.

With ``f`` the filters, ``L = len(f)`` levels (0 = full resolution), ``u_l`` / ``s_l`` the
outputs of encoder level ``l``'s first and last convolution (before pooling), ``v_l`` the
unpooled map entering decoder level ``l`` and ``t_l`` that level's output, task ``k`` computes::

    encoder, l = 0 … L−1:   m = att_l([u_l, a_{l−1}])      (just u_0 at l = 0)
                            a_l = maxpool₂(enc_conv_l(m ⊙ s_l))          f[l+1] channels
    decoder, l = L−1 … 0:   c = dec_conv_l(upsample₂(b_{l+1}))           (b_L = a_{L−1})
                            b_l = att'_l([v_l, c]) ⊙ t_l                 f[l−1] channels
    output:                 head_k(b_0)

(``[·, ·]`` concatenates channels; upsampling is bilinear with ``align_corners=True``; channel
indices are clamped to ``[0, L−1]``). The shared and task parameters are separate submodules:
``model.trunk`` (the SegNet and the shared attention-feature convolutions: CAGrad's
``shared_modules()``) and ``model.tasks[k]``. No single tensor is shared by all the heads (each
task reads every level), so ``forward`` returns ``None`` as its features and gradient methods run
in parameters mode over ``model.trunk`` (:attr:`SegNetMTAN.shared_submodule`).

Initialisation, as the reference: every convolution Xavier-normal with zero bias, every
BatchNorm weight 1 and bias 0. Sizes: the papers' ``filters=(64, 128, 256, 512, 512)`` with
NYUv2's three heads (13, 1, 3 channels) has 44,229,073 parameters: 35,163,456 shared (the SegNet's
24,943,296 and 10,220,160 in the shared attention convolutions), 2,984,576 per task's attention
modules and 111,889 in the heads. The MTAN paper gives MTAN's NYUv2 network as 1.77 times a
single-task SegNet (its script prints the count divided by 24,981,069, the 13-class single-task
SegNet): 44.2 M. :data:`~taskbalance.bench.segnet.CPU_FILTERS` is the CPU size. Input height
and width must be divisible by ``2 ** len(filters)``.

Departures: the segmentation head returns logits (the reference returns ``log_softmax``; the
cross-entropy and the arg-max are the same), and the normal head divides by ``max(‖x‖, 1e-12)``
rather than ``‖x‖``. The reference hard-codes 5 levels and 3 tasks (Cityscapes' copy 2); this
takes any number of levels and tasks. At the deepest decoder level the reference declares its
shared convolution ``f[4] → f[4]`` and the attention input ``f[4] + f[3]`` channels, consistent
only because ``f[3] = f[4]``; here that convolution is ``f[L−1] → f[L−2]`` like every other
decoder level, the same shapes at the papers' size. The reference script's model also holds
uncertainty weighting's three log-variances (``logsigma``); here they belong to the balancer
(``uw``), as in Nash-MTL's copy. Nash-MTL's ``SegNetMtan.shared_parameters()`` selects by name
(everything but ``pred``) and so also lists the per-task attention modules; ``model.trunk`` does
not: they are task-specific (a task's loss does not reach another task's attention).

Example:
    >>> import torch
    >>> model = SegNetMTAN((13, 1, 3), (False, False, True), filters=(4, 8))
    >>> features, (seg, depth, normal) = model(torch.zeros(1, 3, 8, 12))
    >>> features is None, tuple(seg.shape), tuple(normal.shape)
    (True, (1, 13, 8, 12), (1, 3, 8, 12))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional

from taskbalance.bench.api import BenchmarkError
from taskbalance.bench.segnet import (
    PAPER_FILTERS,
    DenseHead,
    SegNetTrunk,
    check_image_size,
    conv_layer,
    segnet_model,
    task_outputs,
)

#: The models the dense benchmarks offer (``--model``): the split SegNet and MTAN.
DENSE_MODELS = ("segnet", "mtan")


def attention_layer(in_channels: int, out_channels: int) -> nn.Sequential:
    """MTAN's attention module: ``Conv 1×1 → BN → ReLU → Conv 1×1 → BN → Sigmoid``.

    Args:
        in_channels: channels of the maps it reads.
        out_channels: channels of the mask (those of the shared map it gates).

    Example:
        >>> import torch
        >>> mask = attention_layer(6, 4)(torch.randn(2, 6, 3, 3))
        >>> tuple(mask.shape), bool(((mask > 0) & (mask < 1)).all())
        ((2, 4, 3, 3), True)
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.BatchNorm2d(out_channels),
        nn.Sigmoid(),
    )


@dataclass(frozen=True)
class SharedMaps:
    """The shared network's maps the attention modules read, one per level (0 = full size).

    Attributes:
        encoder_first: ``u_l``, the output of encoder level ``l``'s first convolution.
        encoder_last: ``s_l``, the output of its last convolution, before pooling.
        decoder_input: ``v_l``, the unpooled map entering decoder level ``l``.
        decoder_output: ``t_l``, decoder level ``l``'s output.
    """

    encoder_first: list[Tensor]
    encoder_last: list[Tensor]
    decoder_input: list[Tensor]
    decoder_output: list[Tensor]


def _clamped(filters: Sequence[int], level: int) -> int:
    return filters[min(max(level, 0), len(filters) - 1)]


class MTANTrunk(nn.Module):
    """MTAN's shared network: a SegNet and the shared attention-feature convolutions.

    Args:
        in_channels: input channels (3 for RGB).
        filters: channels of each level (:data:`~taskbalance.bench.segnet.PAPER_FILTERS`, ...).

    Example:
        >>> import torch
        >>> maps = MTANTrunk(3, (4, 8))(torch.zeros(1, 3, 8, 8))
        >>> [tuple(t.shape[1:]) for t in maps.decoder_output]
        [(4, 8, 8), (4, 4, 4)]
    """

    def __init__(self, in_channels: int = 3, filters: Sequence[int] = PAPER_FILTERS) -> None:
        super().__init__()
        self.segnet = SegNetTrunk(in_channels, filters)
        f = self.segnet.filters
        self.encoder_convs = nn.ModuleList(
            conv_layer(f[level], _clamped(f, level + 1)) for level in range(len(f))
        )
        self.decoder_convs = nn.ModuleList(
            conv_layer(f[level], _clamped(f, level - 1)) for level in range(len(f))
        )

    @property
    def filters(self) -> tuple[int, ...]:
        """Channels of each level."""
        return self.segnet.filters

    def forward(self, images: Tensor) -> SharedMaps:
        """The shared maps of a batch of ``[N, in_channels, H, W]`` images.

        Raises:
            ValueError: H or W not divisible by ``2 ** len(filters)``.
        """
        check_image_size(images, len(self.filters), "SegNetMTAN")
        first: list[Tensor] = []
        last: list[Tensor] = []
        indices: list[Tensor] = []
        x = images
        for block in self.segnet.encoder:
            convs = list(block.children())  # the level's Conv → BN → ReLU units
            u = convs[0](x)
            s = u
            for conv in convs[1:]:
                s = conv(s)
            x, index = functional.max_pool2d(s, 2, 2, return_indices=True)
            first.append(u)
            last.append(s)
            indices.append(index)
        inputs: list[Tensor] = []
        outputs: list[Tensor] = []
        for level in reversed(range(len(self.filters))):
            unpooled = functional.max_unpool2d(x, indices[level], (2, 2), (2, 2))
            x = self.segnet.decoder[level](unpooled)
            inputs.append(unpooled)
            outputs.append(x)
        return SharedMaps(first, last, inputs[::-1], outputs[::-1])


class TaskAttention(nn.Module):
    """One task's attention modules (per encoder and decoder level) and its head.

    Args:
        filters: the trunk's channels per level.
        out_channels: the task's output channels.
        unit: L2-normalise the output over channels (surface normals).
    """

    def __init__(self, filters: Sequence[int], out_channels: int, unit: bool = False) -> None:
        super().__init__()
        f = tuple(filters)
        self.encoder = nn.ModuleList(
            attention_layer(f[0] if level == 0 else 2 * f[level], f[level])
            for level in range(len(f))
        )
        self.decoder = nn.ModuleList(
            attention_layer(f[level] + _clamped(f, level - 1), _clamped(f, level - 1))
            for level in range(len(f))
        )
        self.head = DenseHead(f[0], out_channels, unit)

    def forward(self, maps: SharedMaps, trunk: MTANTrunk) -> Tensor:
        """The task's prediction from the shared maps and the trunk's attention convolutions."""
        attended: Tensor | None = None
        for level, attention in enumerate(self.encoder):
            u = maps.encoder_first[level]
            mask = attention(u if attended is None else torch.cat((u, attended), dim=1))
            gated = trunk.encoder_convs[level](mask * maps.encoder_last[level])
            attended = functional.max_pool2d(gated, 2, 2)
        assert attended is not None  # at least one level
        for level in reversed(range(len(self.decoder))):
            upsampled = functional.interpolate(
                attended, scale_factor=2.0, mode="bilinear", align_corners=True
            )
            carried = trunk.decoder_convs[level](upsampled)
            mask = self.decoder[level](torch.cat((maps.decoder_input[level], carried), dim=1))
            attended = mask * maps.decoder_output[level]
        return self.head(attended)


def reference_init(module: nn.Module) -> None:
    """MTAN's initialisation: convolutions Xavier-normal with zero bias, BatchNorm 1 and 0.

    Example:
        >>> conv = nn.Conv2d(2, 3, 1)
        >>> reference_init(conv)
        >>> conv.bias.tolist()
        [0.0, 0.0, 0.0]
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_normal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class SegNetMTAN(nn.Module):
    """MTAN on SegNet: a shared network and one attention network and head per task.

    ``forward`` returns ``(None, [output per task])``: there is no single shared feature tensor,
    so gradient methods run in parameters mode over :attr:`shared_submodule` (``trunk``).

    Args:
        out_channels: each task's output channels, e.g. ``(13, 1, 3)`` for NYUv2.
        unit_outputs: per task, whether its output is L2-normalised (normals); default none.
        filters: channels per level (:data:`~taskbalance.bench.segnet.PAPER_FILTERS`,
            :data:`~taskbalance.bench.segnet.CPU_FILTERS`).
        in_channels: input channels.

    Raises:
        ValueError: no task, ``unit_outputs`` of another length, a bad ``filters``.

    Example:
        >>> import torch
        >>> model = SegNetMTAN((2, 1), filters=(4, 8))
        >>> shared = {id(p) for p in model.trunk.parameters()}
        >>> any(id(p) in shared for p in model.tasks.parameters())
        False
    """

    #: The submodule holding exactly the shared parameters (what gradient methods differentiate).
    shared_submodule: ClassVar[str] = "trunk"

    def __init__(
        self,
        out_channels: Sequence[int],
        unit_outputs: Sequence[bool] | None = None,
        filters: Sequence[int] = PAPER_FILTERS,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        out_channels, units = task_outputs(out_channels, unit_outputs, "SegNetMTAN")
        self.trunk = MTANTrunk(in_channels, filters)
        self.tasks = nn.ModuleList(
            TaskAttention(self.trunk.filters, channels, unit)
            for channels, unit in zip(out_channels, units, strict=True)
        )
        reference_init(self)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The shared parameters: the trunk's (``params=`` of a gradient method)."""
        return self.trunk.parameters()

    def forward(self, images: Tensor) -> tuple[None, list[Tensor]]:
        """``(None, outputs)``: no single shared feature tensor, one output per task.

        Args:
            images: ``[N, in_channels, H, W]``, H and W divisible by ``2 ** len(filters)``.
        """
        maps = self.trunk(images)
        return None, [task(maps, self.trunk) for task in self.tasks]


def check_dense_model(name: object) -> str:
    """``name`` if it is one of :data:`DENSE_MODELS`, else a BenchmarkError saying so.

    Example:
        >>> check_dense_model("mtan")
        'mtan'
    """
    if name not in DENSE_MODELS:
        raise BenchmarkError(f"model (--model): expected one of {list(DENSE_MODELS)}, got {name!r}")
    return str(name)


def dense_model(
    name: str,
    out_channels: Sequence[int],
    unit_outputs: Sequence[bool] | None = None,
    filters: Sequence[int] = PAPER_FILTERS,
) -> nn.Module:
    """The dense benchmarks' model by name: ``"segnet"`` (split) or ``"mtan"`` (attention).

    Args:
        name: one of :data:`DENSE_MODELS`.
        out_channels: each task's output channels.
        unit_outputs: per task, whether its output is L2-normalised.
        filters: channels per level.

    Returns:
        A module returning ``(features, outputs)`` (features None for MTAN).

    Raises:
        BenchmarkError: an unknown name.

    Example:
        >>> type(dense_model("mtan", (3, 1), filters=(4,))).__name__
        'SegNetMTAN'
    """
    if check_dense_model(name) == "mtan":
        return SegNetMTAN(out_channels, unit_outputs, filters)
    return segnet_model(out_channels, unit_outputs, filters)
