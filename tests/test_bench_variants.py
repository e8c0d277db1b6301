"""Method variants: --set values as Python literals, name[key=value,...] lists."""

from __future__ import annotations

import pytest
import torch

from taskbalance.bench.harness import Method, balancer_arguments
from taskbalance.bench.variants import parse_method, parse_methods, parse_value, split_top_level


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5", 5),
        ("0.25", 0.25),
        ("1e-3", 1e-3),
        ("[1, 2.5]", [1, 2.5]),
        ("1,2", [1, 2]),
        ("(1, 2)", [1, 2]),
        ("True", True),
        ("None", None),
        ("'weighted'", "weighted"),
        ("weighted", "weighted"),
        ("trunk", "trunk"),
        ("torch.float64", torch.float64),
        ("{'a': 1}", {"a": 1}),
    ],
)
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_value_rejects_an_unknown_torch_name():
    with pytest.raises(ValueError, match="torch dtype"):
        parse_value("torch.nonsense")


def test_split_top_level_respects_brackets_and_quotes():
    assert split_top_level("a,b[x=1,y=[2,3]],c") == ["a", "b[x=1,y=[2,3]]", "c"]
    assert split_top_level("x='a,b',y=2") == ["x='a,b'", "y=2"]
    with pytest.raises(ValueError, match="unbalanced"):
        split_top_level("a[b")


def test_parse_methods_with_variants_and_set():
    methods = parse_methods(
        "ew,nash_mtl[update_every=5],mgda[params=trunk],fixed[weights=[1,3]]",
        ["gram_dtype=torch.float64"],
    )
    assert [method.label for method in methods] == [
        "ew",
        "nash_mtl[gram_dtype=torch.float64,update_every=5]",
        "mgda[gram_dtype=torch.float64,params=trunk]",
        "fixed[weights=[1, 3]]",
    ]
    assert methods[1].hyperparameters == {"gram_dtype": torch.float64, "update_every": 5}
    # A variant's own value wins over --set.
    (method,) = parse_methods("mgda[update_every=3]", ["update_every=7"])
    assert method.hyperparameters == {"update_every": 3}


@pytest.mark.parametrize(
    ("text", "sets", "message"),
    [
        ("ew,nope", [], "unknown method 'nope'"),
        ("mgda[colour=red]", [], "mgda has no hyperparameter 'colour'"),
        ("mgda[update_every]", [], "expected key=value"),
        ("mgda[update_every=1", [], "unbalanced brackets"),
        ("mgda]", [], "unknown method"),
        ("ew,uw", ["update_every=5"], "no listed method has a hyperparameter 'update_every'"),
        ("ew,ew", [], "listed twice"),
        ("", [], "expected 'all'"),
    ],
)
def test_bad_variants_are_named(text, sets, message):
    with pytest.raises(ValueError, match=message):
        parse_methods(text, sets)


def test_all_lists_every_method():
    import taskbalance as tb

    assert [method.name for method in parse_methods("all")] == tb.available()


def test_params_names_a_submodule():
    from taskbalance.bench import load_benchmark

    pytest.importorskip("sklearn")
    benchmark = load_benchmark("multidigits", small=True)
    model = benchmark.build_model()
    arguments = balancer_arguments(parse_method("mgda[params=trunk]"), benchmark, 0, model)
    assert [p.data_ptr() for p in arguments["params"]] == [
        p.data_ptr() for p in model.trunk.parameters()
    ]
    arguments = balancer_arguments(parse_method("mgda[params=trunk.3]"), benchmark, 0, model)
    assert len(arguments["params"]) == 2  # the last Linear's weight and bias
    with pytest.raises(ValueError, match="no submodule 'body'"):
        balancer_arguments(parse_method("mgda[params=body]"), benchmark, 0, model)
    # Example values fill a required hyperparameter; the user's value wins.
    import taskbalance as tb

    unit = tb.create("fixed", num_tasks=2, **balancer_arguments(Method("fixed"), benchmark, 0))
    assert float(unit(torch.tensor([2.0, 3.0], requires_grad=True))) == 5.0  # unit weights
    assert balancer_arguments(Method("fixed", {"weights": [2, 1]}), benchmark, 0)["weights"] == [
        2,
        1,
    ]
    assert balancer_arguments(Method("uw"), benchmark, 0)["kinds"] == ["classification"] * 2


def test_set_params_applies_only_to_methods_that_take_it():
    ew, mgda = parse_methods("ew,mgda", ["params=trunk"])
    assert ew.hyperparameters == {}
    assert mgda.hyperparameters == {"params": "trunk"}
    assert mgda.label == "mgda[params=trunk]"
