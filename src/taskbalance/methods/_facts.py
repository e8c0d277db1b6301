"""What each method class declares about itself, for the generic tests and tools.

Every method class may set these class attributes (absent means the default shown):

- ``requires_positive_losses`` (``Balancer``): the method takes logs or ratios of the losses.
- ``signed_weights = False``: the weights may be negative (projections, pseudo-inverses).
- ``claimed_properties = frozenset()``: properties of the direction ``d = Jᵀw`` that the
  method promises on every input, degenerate ones included, from :data:`PROPERTIES`.
- ``required_hyperparameters = {}``: keyword arguments without defaults, with a value that
  works for any number of tasks (``fixed``'s ``weights``).
- ``example_hyperparameters = ()``: non-default settings that the generic tests exercise.
- ``bad_hyperparameters = ()``: ``(hyperparameters, error type, message pattern)`` triples
  that construction must refuse.
- ``requires_params = False``: the method works in parameters mode only (``params=``
  required at construction: MoCo's tracked gradients).
- ``weights_from_gram = True``: ``compute_weights(gram=...)`` gives a call's weights. False
  for a method whose rule reads the task gradients themselves (GradDrop's signs, MoCo's
  tracked gradients): ``compute_weights`` then refuses it with a ValueError naming ``gram``.
- ``normalization_refused`` / ``per_group_refused`` (``GradientBalancer``): why the method
  refuses gradient normalisation / per-group aggregation, or None where it offers it (a
  gradient method that declares nothing refuses both).

:func:`method_facts` reads them with those defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The direction decreases no task to first order: ``g_kᵀd ≥ 0`` for every k.
NON_CONFLICTING = "non_conflicting"
#: Reordering the tasks reorders the weights and leaves ``d`` unchanged.
PERMUTATION_INVARIANT = "permutation_invariant"
#: Scaling every gradient by ``s > 0`` scales ``d`` by ``s``: ``w(s²G) = w(G)``.
SCALE_EQUIVARIANT = "scale_equivariant"
PROPERTIES = frozenset({NON_CONFLICTING, PERMUTATION_INVARIANT, SCALE_EQUIVARIANT})

BadHyperparameters = tuple[tuple[dict[str, Any], type[Exception], str], ...]


@dataclass(frozen=True)
class MethodFacts:
    """The declared facts of one method class, defaults filled in."""

    requires_positive_losses: bool
    signed_weights: bool
    claimed_properties: frozenset[str]
    required_hyperparameters: dict[str, Any]
    example_hyperparameters: tuple[dict[str, Any], ...]
    bad_hyperparameters: BadHyperparameters
    weights_from_gram: bool
    requires_params: bool
    offers_normalization: bool
    offers_per_group: bool


def method_facts(cls: type) -> MethodFacts:
    """The facts ``cls`` declares, with the defaults above for what it does not."""
    return MethodFacts(
        requires_positive_losses=bool(getattr(cls, "requires_positive_losses", False)),
        signed_weights=bool(getattr(cls, "signed_weights", False)),
        claimed_properties=frozenset(getattr(cls, "claimed_properties", frozenset())),
        required_hyperparameters=dict(getattr(cls, "required_hyperparameters", {})),
        example_hyperparameters=tuple(getattr(cls, "example_hyperparameters", ())),
        bad_hyperparameters=tuple(getattr(cls, "bad_hyperparameters", ())),
        weights_from_gram=bool(getattr(cls, "weights_from_gram", True)),
        requires_params=bool(getattr(cls, "requires_params", False)),
        offers_normalization=bool(getattr(cls, "requires_gram", False))
        and getattr(cls, "normalization_refused", "") is None,
        offers_per_group=bool(getattr(cls, "requires_gram", False))
        and getattr(cls, "per_group_refused", "") is None,
    )
