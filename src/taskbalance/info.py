"""Information-theoretic quantities of discrete distributions.

All functions work on a tensor of probabilities (or, with ``from_logits=True``, unnormalised
log-probabilities) whose distribution axis is ``dim``; every other axis is a batch axis. Results
are in nats (natural logarithm).

The argument order follows the notation ``E_P[...]``: the **first** argument is always the
distribution the expectation is taken under. So the cross-entropy ``H_P(Q) = -Σ_x Q(x) log P(x)``
of lecture notes that write the expectation under ``Q`` is ``cross_entropy(Q, P)``, and
``KL(Q‖P) = Σ_x Q(x) log(Q(x)/P(x))`` is ``kl_divergence(Q, P)``.

Conventions (Cover & Thomas, *Elements of Information Theory*, 2nd ed., §2.1–2.3):

* ``0 · log 0 = 0`` and ``0 · log(0/q) = 0``: outcomes without mass contribute nothing.
* ``p · log(p/0) = +inf`` for ``p > 0``: if ``p`` puts mass where ``q`` has none, the
  cross-entropy and the KL divergence are ``+inf``.

Probabilities are checked: they must be non-negative and sum to 1 along ``dim`` (to a relative
tolerance of 1e-4, looser for half precision), otherwise a ``ValueError`` is raised.

Example:
    >>> import torch
    >>> from taskbalance import info
    >>> p = torch.tensor([0.5, 0.5])
    >>> q = torch.tensor([0.9, 0.1])
    >>> round(info.entropy(p).item(), 4)  # log 2
    0.6931
    >>> bool(torch.isclose(info.cross_entropy(p, q), info.entropy(p) + info.kl_divergence(p, q)))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from taskbalance._validation import (
    check_axis,
    check_bool,
    check_distribution,
    check_floating,
    check_int,
    check_probabilities,
    check_same_shape,
)

__all__ = ["cross_entropy", "entropy", "kl_divergence", "self_information"]


def _probabilities_and_logs(
    x: Tensor, name: str, dim: int, from_logits: bool
) -> tuple[Tensor, Tensor]:
    """Returns ``(probabilities, log-probabilities)`` of a validated distribution.

    ``log 0`` is ``-inf``. For probabilities the logarithm is taken of ``where(x > 0, x, 1)`` and
    then masked back to ``-inf``, so that the backward pass never evaluates ``1/0`` (which would
    turn the zero gradient of the masked branch into NaN).
    """
    if from_logits:
        if x.dim() > 0 and x.shape[dim] == 0:  # as check_distribution refuses probabilities
            raise ValueError(
                f"{name}: expected logits of at least one outcome along dim {dim}, got shape "
                f"{tuple(x.shape)}"
            )
        log_x = torch.log_softmax(x, dim=dim)
        return log_x.exp(), log_x
    check_distribution(name, x, dim)
    positive = x > 0
    safe_x = torch.where(positive, x, torch.ones_like(x))
    log_x = torch.where(positive, torch.log(safe_x), -torch.inf)
    return x, log_x


def _expected_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor, dim: int, keepdim: bool) -> Tensor:
    """``Σ p · (log p − log q)`` with ``0·log 0 = 0`` and ``+inf`` where ``p > 0 = q``."""
    has_mass = p > 0
    # Outside the support of p the term is exactly 0. Replacing the logarithms there by 0 (not by
    # masking the product afterwards) keeps 0·inf out of both the forward and the backward pass.
    safe_log_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(has_mass, log_q, torch.zeros_like(log_q))
    return (p * (safe_log_p - safe_log_q)).sum(dim=dim, keepdim=keepdim)


def self_information(p: Tensor, *, dim: int = -1, from_logits: bool = False) -> Tensor:
    """Self-information (surprisal) ``I(x) = −log p(x)`` of each outcome, in nats.

    Shannon (1948), "A Mathematical Theory of Communication"; Cover & Thomas, §2.1.

    With probabilities the formula is applied element-wise: ``p`` need not sum to 1 (it may hold
    the probabilities of unrelated events), but every entry must lie in ``[0, 1]``. ``I = +inf``
    where ``p = 0``. With ``from_logits=True`` the entries along ``dim`` are first normalised with
    ``log_softmax``, so ``I = −log_softmax(p, dim)``.

    Args:
        p: Probabilities in ``[0, 1]``, or logits when ``from_logits`` is true.
        dim: Distribution axis; only used with ``from_logits=True``.
        from_logits: Interpret ``p`` as unnormalised log-probabilities along ``dim``.

    Returns:
        A tensor of the same shape, dtype and device as ``p``.

    Raises:
        TypeError: If ``p`` is not a floating-point tensor.
        ValueError: If a probability lies outside ``[0, 1]``.

    Example:
        >>> import torch
        >>> self_information(torch.tensor([0.5, 0.25, 1.0]))
        tensor([0.6931, 1.3863, -0.0000])
    """
    check_floating("p", p)
    check_int("dim", dim)  # read only with from_logits, checked alike
    from_logits = check_bool("from_logits", from_logits)
    if from_logits:
        return -torch.log_softmax(p, dim=check_axis("p", p, dim))
    check_probabilities("p", p)
    return -torch.log(p)


def entropy(
    p: Tensor, *, dim: int = -1, from_logits: bool = False, keepdim: bool = False
) -> Tensor:
    """Shannon entropy ``H(P) = −Σ_x p(x) log p(x)`` along ``dim``, in nats.

    Shannon (1948); Cover & Thomas, §2.1. ``0 · log 0 = 0``, so ``0 ≤ H(P) ≤ log n`` for ``n``
    outcomes.

    Args:
        p: Probabilities summing to 1 along ``dim``, or logits when ``from_logits`` is true.
        dim: Distribution axis.
        from_logits: Interpret ``p`` as unnormalised log-probabilities (softmax along ``dim``).
        keepdim: Keep ``dim`` as a size-1 axis in the result.

    Returns:
        The entropy, with ``dim`` reduced.

    Raises:
        TypeError: If ``p`` is not a floating-point tensor.
        ValueError: If ``p`` is not a probability distribution along ``dim``.

    Example:
        >>> import torch
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    check_floating("p", p)
    from_logits = check_bool("from_logits", from_logits)
    keepdim = check_bool("keepdim", keepdim)
    dim = check_axis("p", p, dim)
    probabilities, log_p = _probabilities_and_logs(p, "p", dim, from_logits)
    has_mass = probabilities > 0
    safe_log_p = torch.where(has_mass, log_p, torch.zeros_like(log_p))
    # Adding +0.0 turns the −0.0 of a certain outcome (−1·log 1) into 0.0.
    return -(probabilities * safe_log_p).sum(dim=dim, keepdim=keepdim) + 0.0


def cross_entropy(
    p: Tensor, q: Tensor, *, dim: int = -1, from_logits: bool = False, keepdim: bool = False
) -> Tensor:
    """Cross-entropy ``H(P, Q) = −Σ_x p(x) log q(x)`` along ``dim``, in nats.

    Cover & Thomas, §2.3 (``H(P, Q) = H(P) + KL(P‖Q)``). The expectation is taken under the
    **first** argument: the notes' ``H_P(Q) = −Σ Q log P`` is ``cross_entropy(Q, P)``. Terms with
    ``p(x) = 0`` contribute 0 (even if ``q(x) = 0``); the result is ``+inf`` if ``p(x) > 0`` for
    some ``x`` with ``q(x) = 0``.

    Args:
        p: Distribution the expectation is taken under (probabilities, or logits).
        q: Distribution whose log-probabilities are averaged; same shape as ``p``.
        dim: Distribution axis.
        from_logits: Interpret both ``p`` and ``q`` as unnormalised log-probabilities.
        keepdim: Keep ``dim`` as a size-1 axis in the result.

    Returns:
        The cross-entropy, with ``dim`` reduced.

    Raises:
        TypeError: If an argument is not a floating-point tensor.
        ValueError: If the shapes differ or an argument is not a distribution along ``dim``.

    Example:
        >>> import torch
        >>> p = torch.tensor([1.0, 0.0])
        >>> round(cross_entropy(p, torch.tensor([0.5, 0.5])).item(), 4)  # log 2
        0.6931
    """
    check_floating("p", p)
    from_logits = check_bool("from_logits", from_logits)
    keepdim = check_bool("keepdim", keepdim)
    check_floating("q", q)
    check_same_shape("p", p, "q", q)
    dim = check_axis("p", p, dim)
    probabilities_p, _ = _probabilities_and_logs(p, "p", dim, from_logits)
    _, log_q = _probabilities_and_logs(q, "q", dim, from_logits)
    has_mass = probabilities_p > 0
    safe_log_q = torch.where(has_mass, log_q, torch.zeros_like(log_q))
    return -(probabilities_p * safe_log_q).sum(dim=dim, keepdim=keepdim)


def kl_divergence(
    p: Tensor, q: Tensor, *, dim: int = -1, from_logits: bool = False, keepdim: bool = False
) -> Tensor:
    """Kullback–Leibler divergence ``KL(P‖Q) = Σ_x p(x) log(p(x)/q(x))`` along ``dim``, in nats.

    Kullback & Leibler (1951), "On Information and Sufficiency"; Cover & Thomas, §2.3. The
    expectation is taken under the **first** argument: the notes' ``KL(Q‖P)`` is
    ``kl_divergence(Q, P)``. ``KL ≥ 0`` with equality iff ``P = Q``; it is ``+inf`` when ``P``
    puts mass where ``Q`` has none.

    Note that :func:`taskbalance.losses.kl_divergence` is the *loss* form, which follows the
    ``(input, target)`` order of all losses and computes ``KL(target‖input)``.

    Args:
        p: Reference distribution (probabilities, or logits).
        q: Approximating distribution; same shape as ``p``.
        dim: Distribution axis.
        from_logits: Interpret both ``p`` and ``q`` as unnormalised log-probabilities.
        keepdim: Keep ``dim`` as a size-1 axis in the result.

    Returns:
        The divergence, with ``dim`` reduced.

    Raises:
        TypeError: If an argument is not a floating-point tensor.
        ValueError: If the shapes differ or an argument is not a distribution along ``dim``.

    Example:
        >>> import torch
        >>> p = torch.tensor([0.5, 0.5])
        >>> round(kl_divergence(p, torch.tensor([0.25, 0.75])).item(), 4)
        0.1438
        >>> kl_divergence(p, torch.tensor([1.0, 0.0]))
        tensor(inf)
    """
    check_floating("p", p)
    from_logits = check_bool("from_logits", from_logits)
    keepdim = check_bool("keepdim", keepdim)
    check_floating("q", q)
    check_same_shape("p", p, "q", q)
    dim = check_axis("p", p, dim)
    probabilities_p, log_p = _probabilities_and_logs(p, "p", dim, from_logits)
    _, log_q = _probabilities_and_logs(q, "q", dim, from_logits)
    return _expected_log_ratio(probabilities_p, log_p, log_q, dim, keepdim)
