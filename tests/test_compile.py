"""torch.compile (issue 8, item 1): the working pattern gives eager weights, the pitfall raises.

``examples/compile_model.py`` compiles a whole model that returns ``(z, head outputs)`` (which
the balancer must refuse, naming ``features``) and then the trunk and the heads as two graphs,
training a gradient method for a few steps and comparing with eager mode.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import taskbalance as tb

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str) -> str:
    """Run ``examples/<script>`` in a fresh interpreter; its stdout, after checking it passed."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def check_output(stdout: str, tolerance: float) -> None:
    assert "whole-model compile refused: features: no task loss reaches it" in stdout
    assert "compiled weights match eager weights: True" in stdout
    line = next(row for row in stdout.splitlines() if row.startswith("largest difference"))
    numbers = [float(part.strip(",")) for part in line.split() if "e" in part and part[0].isdigit()]
    assert len(numbers) == 2
    assert max(numbers) <= tolerance, line


def test_compiled_trunk_and_heads_train_like_eager_aot_eager():
    # aot_eager traces through AOTAutograd like inductor (the same CompiledFunction node that
    # hides z), without generating C++: the weights equal eager ones to float32 rounding.
    check_output(
        run_example("compile_model.py", "--backend", "aot_eager", "--method", "upgrad"),
        tolerance=1e-6,
    )


@pytest.mark.slow
def test_compiled_trunk_and_heads_train_like_eager_inductor():
    check_output(run_example("compile_model.py", "--backend", "inductor"), tolerance=1e-5)


def test_whole_model_compile_pitfall_raises_in_process():
    torch.manual_seed(0)
    trunk, head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(x):
        z = trunk(x)
        return z, head(z)

    z, out = torch.compile(forward, backend="aot_eager")(torch.randn(5, 3))
    losses = torch.stack([out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()])
    assert type(z.grad_fn).__name__ == "CompiledFunctionBackward"
    for batched in (None, True, False):
        with pytest.raises(ValueError, match=r"^features: no task loss reaches it"):
            tb.gramian(losses, z, batched=batched)
    with pytest.raises(ValueError, match=r"torch\.compile"):
        tb.create("mgda", num_tasks=2)(losses, features=z)


def _compiled_trunk_params_mode_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """UPGrad's weights in parameters mode on a compiled trunk, and eager mode's."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(8, 1) for _ in range(3)])
    x, y = torch.randn(10, 5), torch.randn(10, 3)
    weights = []
    for forward in (torch.compile(trunk), trunk):
        b = tb.create("upgrad", num_tasks=3, params=list(trunk[2].parameters()))
        z = forward(x)
        losses = [nn.functional.mse_loss(heads[k](z).squeeze(1), y[:, k]) for k in range(3)]
        b(losses).backward()
        weights.append(b.weights)
    return weights[0], weights[1]


def test_a_donated_buffers_refusal_names_params_and_the_fix(monkeypatch):
    # Whether inductor donates the backward's buffers depends on the graph and even on the
    # thread count; torch's refusal, when it comes, is turned into one that names the fix.
    from taskbalance import _gramian

    torch_message = (
        "This backward function was compiled with non-empty donated buffers which requires "
        "create_graph=False and retain_graph=False."
    )

    def refuse(*args, **kwargs):
        raise RuntimeError(torch_message)

    monkeypatch.setattr(_gramian, "_rows_by_fastest_path", refuse)
    weight = nn.Parameter(torch.ones(3))
    b = tb.create("upgrad", num_tasks=2, params=[weight])
    with pytest.raises(RuntimeError, match=r"^params: .*donated_buffer = False") as caught:
        b(torch.stack([weight.sum(), (2 * weight).sum()]))
    assert str(caught.value.__cause__) == torch_message


@pytest.mark.slow  # inductor: a C++ build on a fresh machine
def test_parameters_mode_through_a_compiled_trunk_without_donated_buffers_is_eager():
    torch._dynamo.reset()
    with torch._functorch.config.patch(donated_buffer=False):
        compiled, eager = _compiled_trunk_params_mode_weights()
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_the_donated_buffers_fix_runs_as_written_in_a_fresh_interpreter():
    """A new user's `torch._functorch.config.donated_buffer = False` after `import torch`
    raised AttributeError: the submodule must be imported first, as the message now says."""
    import subprocess
    import sys

    from taskbalance._gramian import _DONATED_BUFFERS

    statement = _DONATED_BUFFERS.split("Run `")[1].split("`")[0]
    assignment = "torch._functorch.config.donated_buffer = False"
    assert assignment in _DONATED_BUFFERS
    code = f"import torch\n{statement}\n{assignment}\nprint(torch._functorch.config.donated_buffer)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
