"""Tests for taskbalance.info against scipy.special.entr / rel_entr and closed forms."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import taskbalance.info as info

F64 = torch.float64


def _distributions(shape: tuple[int, ...], seed: int, zeros: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, dtype=F64, generator=g)
    if zeros:
        p = p * (torch.rand(shape, dtype=F64, generator=g) > 0.3)
        p[..., 0] += 0.1  # keep every row non-empty
    return p / p.sum(-1, keepdim=True)


def test_entropy_matches_scipy() -> None:
    p = _distributions((5, 6), 0, zeros=True)
    np.testing.assert_allclose(
        info.entropy(p).numpy(), scipy.special.entr(p.numpy()).sum(-1), rtol=1e-12
    )
    np.testing.assert_allclose(info.entropy(p).numpy(), scipy.stats.entropy(p.numpy(), axis=-1))
    torch.testing.assert_close(info.entropy(p.T.contiguous(), dim=0), info.entropy(p))
    assert info.entropy(p, keepdim=True).shape == (5, 1)
    logits = torch.randn(5, 6, dtype=F64)
    torch.testing.assert_close(
        info.entropy(logits, from_logits=True), info.entropy(torch.softmax(logits, -1))
    )


def test_kl_divergence_matches_rel_entr() -> None:
    p, q = _distributions((5, 6), 1, zeros=True), _distributions((5, 6), 2)
    np.testing.assert_allclose(
        info.kl_divergence(p, q).numpy(),
        scipy.special.rel_entr(p.numpy(), q.numpy()).sum(-1),
        rtol=1e-12,
    )
    # Mass where q has none: +inf, as rel_entr.
    p2, q2 = torch.tensor([0.5, 0.5], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64)
    assert info.kl_divergence(p2, q2).item() == math.inf
    assert scipy.special.rel_entr(p2.numpy(), q2.numpy()).sum() == math.inf
    # 0 · log(0 / q) = 0 and 0 · log(0 / 0) = 0.
    assert info.kl_divergence(q2, q2).item() == 0.0
    assert info.kl_divergence(q2, p2).item() == pytest.approx(math.log(2))
    a, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(
        info.kl_divergence(a, b, from_logits=True),
        info.kl_divergence(a.softmax(-1), b.softmax(-1)),
    )


def test_cross_entropy_identities() -> None:
    p, q = _distributions((4, 5), 3, zeros=True), _distributions((4, 5), 4)
    torch.testing.assert_close(info.cross_entropy(p, q), info.entropy(p) + info.kl_divergence(p, q))
    expected = -scipy.special.xlogy(p.numpy(), q.numpy()).sum(-1)
    np.testing.assert_allclose(info.cross_entropy(p, q).numpy(), expected, rtol=1e-12)
    # Argument order: the notes' H_P(Q) = −Σ Q log P is cross_entropy(Q, P).
    big_q, big_p = p, q
    notes_h_p_of_q = -(big_q * big_p.log()).sum(-1)
    torch.testing.assert_close(info.cross_entropy(big_q, big_p), notes_h_p_of_q)
    assert info.cross_entropy(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])).item() == math.inf
    torch.testing.assert_close(info.cross_entropy(p, p), info.entropy(p))


def test_self_information() -> None:
    p = torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=F64)
    torch.testing.assert_close(
        info.self_information(p), torch.tensor([0.0, math.log(2), math.log(4), math.inf], dtype=F64)
    )
    logits = torch.randn(3, 4)
    torch.testing.assert_close(
        info.self_information(logits, from_logits=True), -torch.log_softmax(logits, -1)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_finite_gradients(dtype: torch.dtype) -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=dtype, requires_grad=True)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.1, 0.8]], dtype=dtype, requires_grad=True)
    for value in (info.entropy(p), info.cross_entropy(p, q), info.kl_divergence(p, q)):
        assert value.dtype == dtype
        p.grad = q.grad = None
        value.sum().backward()
        assert torch.isfinite(p.grad).all()
        assert q.grad is None or torch.isfinite(q.grad).all()
    assert info.self_information(p).dtype == dtype


def test_gradcheck() -> None:
    p = _distributions((3, 4), 5).requires_grad_(True)
    q = _distributions((3, 4), 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: info.kl_divergence(a, b), (p, q))
    assert torch.autograd.gradcheck(lambda a, b: info.cross_entropy(a, b), (p, q))
    assert torch.autograd.gradcheck(lambda a: info.entropy(a), (p,))
    logits = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: info.entropy(a, from_logits=True), (logits,))


def _probability_vectors(draw: st.DrawFn, size: int) -> np.ndarray:
    raw = draw(arrays(np.float64, size, elements=st.floats(0.0, 1.0)))
    raw[0] += 1e-3
    return raw / raw.sum()


@st.composite
def _pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    size = draw(st.integers(1, 8))
    return _probability_vectors(draw, size), _probability_vectors(draw, size)


@settings(max_examples=60, deadline=None)
@given(_pair())
def test_information_inequalities(pair: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = (torch.from_numpy(x) for x in pair)
    kl = info.kl_divergence(p, q).item()
    assert kl >= -1e-12  # Gibbs' inequality
    entropy = info.entropy(p).item()
    assert -1e-12 <= entropy <= math.log(len(p)) + 1e-12
    assert info.cross_entropy(p, q).item() >= entropy - 1e-9
    assert info.kl_divergence(p, p).item() == pytest.approx(0.0, abs=1e-12)


def test_invalid_distributions() -> None:
    with pytest.raises(
        ValueError, match=r"p: expected sums of 1 along dim 1 .* got sums in \[0.5, 1\]"
    ):
        info.entropy(torch.tensor([[0.25, 0.25], [0.5, 0.5]]))
    with pytest.raises(
        ValueError, match=r"q: expected sums of 1 along dim 0 .* got sums in \[1.2, 1.2\]"
    ):
        info.kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.6, 0.6]))
    with pytest.raises(
        ValueError,
        match=r"p: expected a probability distribution with non-negative entries, "
        r"got a minimum of -0.5",
    ):
        info.cross_entropy(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"p: expected probabilities in \[0, 1\], got 2"):
        info.self_information(torch.tensor([0.5, 2.0]))
    with pytest.raises(
        ValueError, match=r"p, q: expected the same shape, got p shape \(2,\) and q shape \(3,\)"
    ):
        info.kl_divergence(torch.tensor([0.5, 0.5]), torch.ones(3) / 3)
    with pytest.raises(
        ValueError, match=r"dim: expected an axis in \[-1, 0\] for p of shape \(2,\), got 1"
    ):
        info.entropy(torch.tensor([0.5, 0.5]), dim=1)
    with pytest.raises(
        TypeError, match=r"p: expected a floating-point tensor, got dtype torch.int64"
    ):
        info.entropy(torch.tensor([1, 0]))
    # Within the relative tolerance of 1e-4: accepted.
    info.entropy(torch.tensor([0.5, 0.50004], dtype=F64))


def test_module_doctests() -> None:
    assert doctest.testmod(info).failed == 0
