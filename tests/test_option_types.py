"""Flags and integer options of the losses, information and Gumbel tools refuse other types.

A flag given as the string ``"False"`` (read from a configuration file) counted as true: the
loss applied a softmax the user had switched off, silently. Every ``bool``, ``int`` and
generator option is checked before use, by name; the table below is checked against the
signatures, so a new option cannot be left out.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import pytest
import torch

import taskbalance as tb
from taskbalance import distributions, info, losses

X = torch.zeros(2, 3)
P = torch.full((2, 3), 1 / 3)
INDICES = torch.tensor([0, 1])
MASKS = torch.zeros(1, 3, 2, 2)
#: valid with multiclass=True (one-hot along dim 1) and with multiclass=False (binary masks)
ONE_HOT = torch.nn.functional.one_hot(torch.zeros(1, 2, 2, dtype=torch.long), 3).movedim(-1, 1)
ONE_HOT = ONE_HOT.float()


def _module_call(cls: type, *args: torch.Tensor, **kwargs: object) -> Callable[..., object]:
    """Construct ``cls`` with the option (the error must come here), then call it."""

    def call(**option: object) -> object:
        return cls(**kwargs, **option)(*args)

    return call


#: (owner, option, kind, call taking the option as a keyword)
CASES: list[tuple[str, str, str, Callable[..., object]]] = [
    (
        "losses.binary_cross_entropy",
        "from_logits",
        "bool",
        lambda **o: losses.binary_cross_entropy(X, P, **o),
    ),
    (
        "losses.cross_entropy",
        "ignore_index",
        "int",
        lambda **o: losses.cross_entropy(X, INDICES, **o),
    ),
    ("losses.focal_loss", "ignore_index", "int?", lambda **o: losses.focal_loss(X, INDICES, **o)),
    (
        "losses.dice_loss",
        "multiclass",
        "bool",
        lambda **o: losses.dice_loss(MASKS, ONE_HOT, **{"from_logits": True, **o}),
    ),
    ("losses.dice_loss", "from_logits", "bool", lambda **o: losses.dice_loss(X, P, **o)),
    (
        "losses.gaussian_nll_loss",
        "full",
        "bool",
        lambda **o: losses.gaussian_nll_loss(X, X, log_variance=X, **o),
    ),
    ("losses.kl_divergence", "from_logits", "bool", lambda **o: losses.kl_divergence(P, P, **o)),
    ("losses.kl_divergence", "dim", "int", lambda **o: losses.kl_divergence(P, P, **o)),
    ("losses.tukey_loss", "mad_scaling", "bool", lambda **o: losses.tukey_loss(X, X, **o)),
    (
        "losses.tukey_loss",
        "mad_dim",
        "int?",
        lambda **o: losses.tukey_loss(X, X + 1, mad_scaling=True, **o),
    ),
    (
        "losses.BinaryCrossEntropyLoss",
        "from_logits",
        "bool",
        _module_call(losses.BinaryCrossEntropyLoss, X, P),
    ),
    (
        "losses.CrossEntropyLoss",
        "ignore_index",
        "int",
        _module_call(losses.CrossEntropyLoss, X, INDICES),
    ),
    ("losses.FocalLoss", "ignore_index", "int?", _module_call(losses.FocalLoss, X, INDICES)),
    (
        "losses.DiceLoss",
        "multiclass",
        "bool",
        _module_call(losses.DiceLoss, MASKS, ONE_HOT, from_logits=True),
    ),
    ("losses.DiceLoss", "from_logits", "bool", _module_call(losses.DiceLoss, X, P)),
    (
        "losses.GaussianNLLLoss",
        "full",
        "bool",
        lambda **o: losses.GaussianNLLLoss(**o)(X, X, log_variance=X),
    ),
    ("losses.KLDivergenceLoss", "from_logits", "bool", _module_call(losses.KLDivergenceLoss, P, P)),
    ("losses.KLDivergenceLoss", "dim", "int", _module_call(losses.KLDivergenceLoss, P, P)),
    ("losses.TukeyLoss", "mad_scaling", "bool", _module_call(losses.TukeyLoss, X, X)),
    (
        "losses.TukeyLoss",
        "mad_dim",
        "int?",
        _module_call(losses.TukeyLoss, X, X + 1, mad_scaling=True),
    ),
    ("info.self_information", "dim", "int", lambda **o: info.self_information(P, **o)),
    ("info.self_information", "from_logits", "bool", lambda **o: info.self_information(P, **o)),
    *[
        (f"info.{name}", option, kind, call)
        for name, call in (
            ("entropy", lambda **o: info.entropy(P, **o)),
            ("cross_entropy", lambda **o: info.cross_entropy(P, P, **o)),
            ("kl_divergence", lambda **o: info.kl_divergence(P, P, **o)),
        )
        for option, kind in (("dim", "int"), ("from_logits", "bool"), ("keepdim", "bool"))
    ],
    (
        "distributions.gumbel_softmax",
        "hard",
        "bool",
        lambda **o: distributions.gumbel_softmax(X, **o),
    ),
    (
        "distributions.gumbel_softmax",
        "generator",
        "generator",
        lambda **o: distributions.gumbel_softmax(X, **o),
    ),
    (
        "distributions.gumbel_max_sample",
        "generator",
        "generator",
        lambda **o: distributions.gumbel_max_sample(X, **o),
    ),
    *[
        (
            f"distributions.Gumbel.{method}",
            "generator",
            "generator",
            lambda method=method, **o: getattr(
                distributions.Gumbel(torch.zeros(2), torch.ones(2)), method
            )(**o),
        )
        for method in ("rsample", "sample")
    ],
]

#: Values of the option's type that are accepted, and values of other types that are refused.
GOOD: dict[str, list[object]] = {
    "bool": [True, False, np.True_, np.False_],
    "int": [-1, np.int64(-1)],
    "int?": [None, 0, np.int64(0)],
    "generator": [None, torch.Generator().manual_seed(0)],
}
BAD: dict[str, list[object]] = {
    "bool": ["False", 1, None, torch.tensor(True)],
    "int": ["0", 0.0, True, None],
    "int?": ["0", 0.5, False],
    "generator": [0, "cpu", torch.zeros(2)],
}
EXPECTED = {
    "bool": "True or False",
    "int": "an int",
    "int?": "None or an int",
    "generator": "None or a torch.Generator",
}


@pytest.mark.parametrize(
    ("owner", "option", "kind", "call"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_an_option_of_another_type_is_refused_by_name(owner, option, kind, call) -> None:
    for value in GOOD[kind]:
        call(**{option: value})
    for value in BAD[kind]:
        with pytest.raises(TypeError, match=rf"^{option}: expected {EXPECTED[kind]}, got "):
            call(**{option: value})


def _annotated_options() -> set[tuple[str, str]]:
    kinds = {"bool", "int", "int | None", "torch.Generator | None"}
    found = set()
    for module, prefix in ((losses, "losses"), (info, "info"), (distributions, "distributions")):
        for name in module.__all__:
            obj = getattr(module, name)
            targets = (
                [(name, obj.__init__)]
                + [
                    (f"{name}.{method}", getattr(obj, method))
                    for method in ("rsample", "sample")
                    if method in vars(obj)
                ]
                if inspect.isclass(obj)
                else [(name, obj)]
            )
            for label, target in targets:
                if not callable(target):
                    continue
                for parameter in inspect.signature(target).parameters.values():
                    if str(parameter.annotation) in kinds:
                        found.add((f"{prefix}.{label}", parameter.name))
    return found


def test_the_table_covers_every_flag_int_and_generator_option() -> None:
    assert {(owner, option) for owner, option, _, _ in CASES} == _annotated_options()


def test_numpy_scalars_are_numbers_for_every_real_hyperparameter() -> None:
    """np.float32 passed the scalar checks but not the per-task ones (review)."""
    famo = tb.create("famo", num_tasks=2, lr=np.float32(0.5), min_losses=np.float32(0.0))
    assert famo.min_losses.tolist() == [0.0, 0.0]
    stch = tb.create("stch", num_tasks=2, nadir=np.float32(0.5))
    assert stch.nadir.tolist() == [0.5, 0.5]
    assert losses.binary_cross_entropy(P[0], P[0], from_logits=np.True_).item() > 0
