"""The field's metrics against hand values and an independent numpy / scikit-learn computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sklearn.metrics import confusion_matrix, f1_score

from taskbalance.metrics import (
    BinaryAccuracy,
    BinaryF1,
    ConfusionMatrix,
    DepthAbsError,
    DepthRelError,
    MeanIoU,
    NormalMeanAngle,
    NormalMedianAngle,
    NormalWithinAngle,
    PixelAccuracy,
    delta_m,
    normal_angles,
    nyuv2_metrics,
)

# Two 2×4 label maps with NYUv2's -1 and another loader's 255, both ignored.
TARGET = torch.tensor([[[0, 0, 1, -1], [2, 255, 1, 1]]])
PRED = torch.tensor([[[0, 1, 1, 2], [2, 0, 0, 1]]])
# Counted pairs (true, pred): (0,0) (0,1) (1,1) (2,2) (1,0) (1,1).
HAND_MATRIX = [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
# IoU: class 0: 1/(2+2-1), class 1: 2/(3+3-2), class 2: 1/1.
HAND_MIOU = (1 / 3 + 1 / 2 + 1) / 3


def test_confusion_matrix_by_hand_ignores_minus_one_and_255():
    matrix = ConfusionMatrix(3)
    matrix.update(PRED, TARGET)
    assert matrix.counts.tolist() == HAND_MATRIX


def test_miou_and_pixel_accuracy_by_hand():
    miou, accuracy = MeanIoU(3), PixelAccuracy(3)
    for metric in (miou, accuracy):
        metric.update(PRED, TARGET)
    assert miou.compute() == pytest.approx(HAND_MIOU)
    assert accuracy.compute() == pytest.approx(4 / 6)
    assert miou.direction == accuracy.direction == "higher"


def test_logits_give_the_same_confusion_as_their_argmax():
    logits = torch.nn.functional.one_hot(PRED, 3).permute(0, 3, 1, 2).float() * 5
    miou = MeanIoU(3)
    miou.update(logits, TARGET.float())  # float labels as the NYUv2 .npy files store them
    assert miou.compute() == pytest.approx(HAND_MIOU)


def test_empty_class_is_nan_as_the_reference_or_ignored_on_request():
    reference, ignoring = MeanIoU(4), MeanIoU(4, empty_classes="ignore")
    for metric in (reference, ignoring):
        metric.update(PRED, TARGET)
    assert math.isnan(reference.compute())
    assert ignoring.compute() == pytest.approx(HAND_MIOU)


def test_class_only_predicted_counts_as_zero_iou_not_empty():
    miou = MeanIoU(2, empty_classes="ignore")
    miou.update(torch.tensor([0, 1]), torch.tensor([0, 0]))  # class 1: FP only
    assert miou.compute() == pytest.approx((1 / 2 + 0) / 2)


def test_segmentation_over_batches_matches_sklearn():
    generator = torch.Generator().manual_seed(0)
    miou, accuracy = MeanIoU(5), PixelAccuracy(5)
    all_pred, all_target = [], []
    for _ in range(4):
        logits = torch.randn(3, 5, 6, 7, generator=generator)
        target = torch.randint(-1, 5, (3, 6, 7), generator=generator)
        for metric in (miou, accuracy):
            metric.update(logits, target)
        all_pred.append(logits.argmax(1).flatten().numpy())
        all_target.append(target.flatten().numpy())
    pred, target = np.concatenate(all_pred), np.concatenate(all_target)
    keep = target >= 0
    matrix = confusion_matrix(target[keep], pred[keep], labels=range(5))
    np.testing.assert_array_equal(miou.matrix.counts.numpy(), matrix)
    iou = np.diag(matrix) / (matrix.sum(0) + matrix.sum(1) - np.diag(matrix))
    assert miou.compute() == pytest.approx(iou.mean())
    assert accuracy.compute() == pytest.approx((pred[keep] == target[keep]).mean())


def test_depth_errors_skip_zero_depth_by_pixel_and_by_batch():
    # Batch 1: valid errors |1-2| = 1, |7-4| = 3; batch 2: |0-6| = 6; zeros are missing depth.
    batches = [
        (torch.tensor([[[[1.0, 9.0], [7.0, 3.0]]]]), torch.tensor([[[[2.0, 0.0], [4.0, 0.0]]]])),
        (torch.tensor([[[[0.0, 5.0]]]]), torch.tensor([[[[6.0, 0.0]]]])),
    ]
    by_pixel, by_batch = DepthAbsError(), DepthAbsError(reduction="batch")
    rel_pixel, rel_batch = DepthRelError(), DepthRelError(reduction="batch")
    for pred, target in batches:
        for metric in (by_pixel, by_batch, rel_pixel, rel_batch):
            metric.update(pred, target)
    assert by_pixel.compute() == pytest.approx(10 / 3)
    assert by_batch.compute() == pytest.approx((2 + 6) / 2)
    assert rel_pixel.compute() == pytest.approx((1 / 2 + 3 / 4 + 1) / 3)
    assert rel_batch.compute() == pytest.approx(((1 / 2 + 3 / 4) / 2 + 1) / 2)
    assert by_pixel.direction == rel_pixel.direction == "lower"


def test_depth_errors_match_numpy_on_random_batches():
    generator = torch.Generator().manual_seed(1)
    metric = DepthAbsError()
    rel = DepthRelError()
    errors, relative = [], []
    for _ in range(3):
        target = torch.rand(2, 1, 5, 4, generator=generator) * 10
        target[torch.rand(target.shape, generator=generator) < 0.3] = 0
        pred = torch.rand(2, 1, 5, 4, generator=generator) * 10
        metric.update(pred, target)
        rel.update(pred, target)
        p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
        errors.append(np.abs(p - t)[t != 0])
        relative.append((np.abs(p - t) / np.where(t == 0, 1, t))[t != 0])
    assert metric.compute() == pytest.approx(np.concatenate(errors).mean())
    assert rel.compute() == pytest.approx(np.concatenate(relative).mean())


def _normals(*vectors: tuple[float, float, float]) -> torch.Tensor:
    """``[1, 3, 1, P]`` normals from P vectors."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, len(vectors))


def test_normal_angles_by_hand_with_invalid_pixels():
    target = _normals((0, 0, 1), (0, 0, 1), (1, 0, 0), (0, 0, 0), (0, 1, 0))
    # Predictions need not be unit length: 0°, 90°, 180°, (invalid), 60°.
    pred = _normals((0, 0, 3), (2, 0, 0), (-1, 0, 0), (1, 1, 1), (0, 0.5, math.sqrt(3) / 2))
    angles = normal_angles(pred, target)
    np.testing.assert_allclose(angles.numpy(), [0, 90, 180, 60], atol=1e-4)
    mean, median = NormalMeanAngle(), NormalMedianAngle()
    within = {t: NormalWithinAngle(t) for t in (11.25, 22.5, 30.0, 61.0)}
    for metric in (mean, median, *within.values()):
        metric.update(pred, target)
    assert mean.compute() == pytest.approx(330 / 4, abs=1e-4)
    assert median.compute() == pytest.approx((60 + 90) / 2, abs=1e-4)  # even count: middle mean
    assert within[30.0].compute() == pytest.approx(1 / 4)
    assert within[61.0].compute() == pytest.approx(2 / 4)
    assert mean.direction == median.direction == "lower"
    assert within[11.25].direction == "higher"
    assert within[11.25].name == "normal_within_11.25"


def test_a_normal_whose_components_sum_to_zero_is_valid():
    s = 1 / math.sqrt(2)
    angles = normal_angles(_normals((s, 0, -s)), _normals((s, 0, -s)))
    assert angles.numel() == 1


def test_normal_metrics_match_numpy_over_batches_and_per_batch():
    generator = torch.Generator().manual_seed(2)
    metrics = nyuv2_metrics()[2]
    batch_metrics = nyuv2_metrics(reduction="batch")[2]
    per_batch = []
    for _ in range(3):
        target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5, generator=generator), dim=1)
        target[:, :, 0, :2] = 0  # missing measurements
        pred = target + 0.6 * torch.randn(2, 3, 4, 5, generator=generator)
        for metric in metrics + batch_metrics:
            metric.update(pred, target)
        p = pred.numpy().astype(np.float64)
        t = target.numpy().astype(np.float64)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        valid = np.any(t != 0, axis=1)
        cosine = np.clip((p * t).sum(1)[valid], -1, 1)
        per_batch.append(np.degrees(np.arccos(cosine)))

    def statistics(angles: np.ndarray) -> list[float]:
        return [np.mean(angles), np.median(angles)] + [
            np.mean(angles < t) for t in (11.25, 22.5, 30)
        ]

    expected = statistics(np.concatenate(per_batch))
    expected_batch = np.mean([statistics(a) for a in per_batch], axis=0)
    np.testing.assert_allclose([m.compute() for m in metrics], expected, rtol=1e-5)
    np.testing.assert_allclose([m.compute() for m in batch_metrics], expected_batch, rtol=1e-5)


def test_binary_f1_and_accuracy_match_sklearn_per_attribute():
    generator = torch.Generator().manual_seed(3)
    f1, accuracy = BinaryF1(), BinaryAccuracy()
    logits, labels = [], []
    for _ in range(3):
        batch_logits = torch.randn(16, 4, generator=generator)
        batch_labels = (torch.rand(16, 4, generator=generator) < 0.4).float()
        f1.update(batch_logits, batch_labels)
        accuracy.update(batch_logits, batch_labels)
        logits.append(batch_logits.numpy())
        labels.append(batch_labels.numpy())
    predicted = np.concatenate(logits) > 0
    truth = np.concatenate(labels).astype(bool)
    assert f1.compute() == pytest.approx(f1_score(truth, predicted, average="macro"), abs=1e-6)
    assert accuracy.compute() == pytest.approx((predicted == truth).mean())


def test_binary_f1_by_hand_with_probabilities_and_no_positive_is_zero():
    f1 = BinaryF1(logits=False)
    f1.update(torch.tensor([0.9, 0.2, 0.7, 0.6]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert f1.compute() == pytest.approx(2 / 3, abs=1e-6)  # TP 2, FP 1, FN 1
    empty = BinaryF1()
    empty.update(torch.tensor([-1.0, -2.0]), torch.tensor([0.0, 0.0]))
    assert empty.compute() == 0.0  # the ε keeps 0/0 at 0, as FAMO's code


def test_reset_forgets_every_batch():
    for metric in nyuv2_metrics(num_classes=3)[0]:
        metric.update(PRED, TARGET)
        metric.reset()
        metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
        assert metric.compute() == 1.0
    depth = DepthAbsError()
    depth.update(torch.ones(1, 1, 2), torch.full((1, 1, 2), 3.0))
    depth.reset()
    assert math.isnan(depth.compute())


def test_delta_m_by_hand_and_libmtl_task_average():
    # mIoU 0.5 vs 0.4 (+25% better), depth 1.0 vs 2.0 (-50%, better), normal 40 vs 20 (+100%).
    values, baselines = [0.5, 1.0, 40.0], [0.4, 2.0, 20.0]
    directions = ["higher", "lower", "lower"]
    assert delta_m(values, baselines, directions) == pytest.approx((-25 - 50 + 100) / 3)
    # Task-averaged: task A = (-25 - 50)/2, task B = 100.
    assert delta_m(values, baselines, directions, tasks=["a", "a", "b"]) == pytest.approx(
        (-37.5 + 100) / 2
    )
    assert delta_m(baselines, baselines, [True, False, False]) == 0.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([], [], []), "non-empty"),
        (([1.0], [1.0, 2.0], ["higher"]), "equal length"),
        (([1.0], [0.0], ["higher"]), "baselines\\[0\\] is 0"),
        (([1.0], [1.0], ["up"]), "directions\\[0\\]"),
    ],
)
def test_delta_m_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        delta_m(*args)


def test_delta_m_zero_baseline_raises_by_default_or_is_nan_on_request():
    args = ([0.9, 2.0, 1.0], [1.0, 0.0, 1.0], [True, False, False])
    with pytest.raises(ValueError, match=r"baselines\[1\] is 0.*on_zero_baseline='nan'"):
        delta_m(*args)
    assert math.isnan(delta_m(*args, on_zero_baseline="nan"))
    assert math.isnan(delta_m(*args, tasks=[0, 0, 1], on_zero_baseline="nan"))
    # "nan" is only about zero baselines: malformed input still raises.
    with pytest.raises(ValueError, match=r"directions\[2\]"):
        delta_m([1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [True, True, "up"], on_zero_baseline="nan")
    with pytest.raises(ValueError, match="equal length"):
        delta_m([1.0], [0.0, 1.0], [True], on_zero_baseline="nan")
    with pytest.raises(ValueError, match="on_zero_baseline must be 'raise' or 'nan', got 'skip'"):
        delta_m([1.0], [1.0], [True], on_zero_baseline="skip")  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
@example(triples=[(1.0, -5e-324, True), (-1.0, -2.2250738585e-313, True)])
def test_delta_m_nan_mode_agrees_with_raise_mode(triples):
    values, baselines, directions = (list(column) for column in zip(*triples, strict=True))
    if any(baseline == 0 for baseline in baselines):
        with pytest.raises(ValueError, match="is 0"):
            delta_m(values, baselines, directions)
        assert math.isnan(delta_m(values, baselines, directions, on_zero_baseline="nan"))
    else:
        strict = delta_m(values, baselines, directions)
        lenient = delta_m(values, baselines, directions, on_zero_baseline="nan")
        # A subnormal baseline overflows the ratio to ±inf, and inf − inf is NaN in both modes.
        assert lenient == strict or (math.isnan(lenient) and math.isnan(strict))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="same shape"):
        DepthAbsError().update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 3))
    with pytest.raises(ValueError, match="reduction"):
        NormalMeanAngle(reduction="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes=3"):
        MeanIoU(3).update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        MeanIoU(0)
    with pytest.raises(TypeError, match="pred"):
        PixelAccuracy(2).update([0, 1], torch.tensor([0, 1]))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        NormalWithinAngle(0)


def test_depth_errors_without_a_channel_axis_are_per_pixel() -> None:
    # [N, H, W]: the old mask took axis 1 for channels, so the zero-depth pixel (0, 0) counted
    # because (0, 1, 0) has depth, giving |1 − 0| / 0 = inf.
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    target = torch.tensor([[[0.0, 2.0], [1.0, 4.0]]])
    absolute, relative = DepthAbsError(), DepthRelError()
    absolute.update(pred, target)
    relative.update(pred, target)
    assert absolute.compute() == pytest.approx((0 + 2 + 0) / 3)
    assert relative.compute() == pytest.approx((0 + 2 / 1 + 0) / 3)
    # Random [N, H, W] batches against numpy, by pixel and by batch; [N, 1, H, W] agrees.
    generator = torch.Generator().manual_seed(2)
    metrics = {
        (name, reduction, shape): metric(reduction)
        for name, metric in (("abs", DepthAbsError), ("rel", DepthRelError))
        for reduction in ("pixel", "batch")
        for shape in ("nhw", "n1hw")
    }
    errors: dict[str, list[np.ndarray]] = {"abs": [], "rel": []}
    for _ in range(3):
        target = torch.rand(2, 5, 4, generator=generator) * 10
        target[torch.rand(target.shape, generator=generator) < 0.3] = 0
        pred = torch.rand(2, 5, 4, generator=generator) * 10
        for (_, _, shape), metric in metrics.items():
            if shape == "nhw":
                metric.update(pred, target)
            else:
                metric.update(pred.unsqueeze(1), target.unsqueeze(1))
        p, t = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
        errors["abs"].append(np.abs(p - t)[t != 0])
        errors["rel"].append((np.abs(p - t) / np.where(t == 0, 1, t))[t != 0])
    for (name, reduction, _), metric in metrics.items():
        expected = (
            np.concatenate(errors[name]).mean()
            if reduction == "pixel"
            else np.mean([batch.mean() for batch in errors[name]])
        )
        assert metric.compute() == pytest.approx(expected, rel=1e-12)


def test_binary_counts_refuse_other_shapes_and_a_changed_column_count_by_name():
    """A 0-d prediction raised an IndexError from inside the count, and a batch with another
    number of attribute columns a raw broadcasting RuntimeError; the state is unchanged."""
    from taskbalance.metrics import BinaryF1

    f1 = BinaryF1()
    with pytest.raises(ValueError, match=r"pred: expected shape \[N\] or \[N, A\]"):
        f1.update(torch.tensor(1.0), torch.tensor(1.0))
    f1.update(torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 1.0]]))
    before = f1.compute()
    with pytest.raises(ValueError, match=r"expected 2 attribute column\(s\)"):
        f1.update(torch.tensor([[2.0, -1.0, 1.0]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert f1.compute() == before


def test_normal_within_angle_refuses_a_bool_threshold():
    from taskbalance.metrics import NormalWithinAngle

    with pytest.raises(ValueError, match=r"threshold must be an angle in \(0, 180\]"):
        NormalWithinAngle(True)  # type: ignore[arg-type]
    assert NormalWithinAngle(30).threshold == 30.0
