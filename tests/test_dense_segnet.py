"""The SegNet trunk and heads, and MTAN's dense losses against hand values and torch's ops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from taskbalance.bench.dense import depth_loss, normal_loss, segmentation_loss
from taskbalance.bench.segnet import CPU_FILTERS, PAPER_FILTERS, SegNetTrunk, segnet_model


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def test_paper_size_has_vgg16_encoder_and_a_mirrored_decoder():
    trunk = SegNetTrunk(3, PAPER_FILTERS)
    encoder = [_convs(level) for level in trunk.encoder]
    assert [len(level) for level in encoder] == [2, 2, 3, 3, 3]  # VGG-16's 13 convolutions
    assert [level[-1].out_channels for level in encoder] == list(PAPER_FILTERS)
    decoder = [_convs(level) for level in trunk.decoder]
    assert [len(level) for level in decoder] == [2, 2, 3, 3, 3]
    assert [level[-1].out_channels for level in decoder] == [64, 64, 128, 256, 512]
    # 13 + 13 convolutions of 3×3 with BatchNorm: about 24.9 M parameters (SegNet's ~29 M
    # includes its own classifier head; MTAN's split SegNet shares this trunk).
    count = sum(p.numel() for p in trunk.parameters())
    assert 24e6 < count < 26e6


def test_outputs_have_the_task_shapes_and_normals_are_unit():
    torch.manual_seed(0)
    model = segnet_model((13, 1, 3), (False, False, True), filters=CPU_FILTERS)
    features, (seg, depth, normal) = model(torch.rand(2, 3, 16, 24))
    assert features.shape == (2, CPU_FILTERS[0], 16, 24)
    assert seg.shape == (2, 13, 16, 24)
    assert depth.shape == (2, 1, 16, 24)
    torch.testing.assert_close(normal.norm(dim=1), torch.ones(2, 16, 24))


def test_every_parameter_gets_a_gradient_from_the_three_losses():
    torch.manual_seed(1)
    model = segnet_model((13, 1, 3), (False, False, True), filters=(4, 8))
    _, (seg, depth, normal) = model(torch.rand(2, 3, 8, 8))
    labels = torch.randint(-1, 13, (2, 8, 8))
    depth_target = torch.rand(2, 1, 8, 8) + 1
    normal_target = nn.functional.normalize(torch.randn(2, 3, 8, 8), dim=1)
    loss = (
        segmentation_loss(seg, labels)
        + depth_loss(depth, depth_target)
        + normal_loss(normal, normal_target)
    )
    loss.backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_sizes_not_divisible_by_the_pooling_are_refused():
    with pytest.raises(ValueError, match="divisible by 8"):
        SegNetTrunk(3, CPU_FILTERS)(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match="filters"):
        SegNetTrunk(3, ())
    with pytest.raises(ValueError, match="unit_outputs"):
        segnet_model((13, 1), (False,))


def test_segmentation_loss_ignores_minus_one_and_255_like_torch():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0, 0] = -1
    labels[1, 2, 1] = 255
    keep = (labels >= 0) & (labels < 4)
    expected = nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], labels[keep])
    torch.testing.assert_close(segmentation_loss(logits, labels), expected)
    torch.testing.assert_close(segmentation_loss(logits, labels.float()), expected)


def test_depth_loss_by_hand_skips_missing_pixels():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 9.0]]]])
    target = torch.tensor([[[[2.0, 2.0], [1.0, 0.0]]]])  # errors 1, 0, 2; last pixel missing
    assert float(depth_loss(pred, target)) == pytest.approx(1.0)


def test_normal_loss_by_hand_is_one_minus_mean_cosine_over_valid_pixels():
    pred = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]])
    # Pixel cosines: 1, 0; the third pixel has no normal.
    assert float(normal_loss(pred, target)) == pytest.approx(1 - 1 / 2)


def test_losses_without_any_valid_pixel_are_finite_constants():
    pred = torch.ones(1, 1, 2, 2, requires_grad=True)
    loss = depth_loss(pred, torch.zeros(1, 1, 2, 2))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(pred.grad.abs().sum()) == 0.0
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    assert float(segmentation_loss(logits, torch.full((1, 2, 2), -1)).detach()) == 0.0
