"""The lower bounds pyproject declares are the versions the test command installs and runs."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def test_python_bound_is_the_tested_python():
    project = _pyproject()["project"]
    bound = _version(project["requires-python"])
    assert project["requires-python"].startswith(">=")
    # The test command runs on the bound itself (3.11 here); a newer interpreter must be admitted.
    assert bound <= sys.version_info[:2], (bound, sys.version_info[:2])
    classifiers = project["classifiers"]
    assert f"Programming Language :: Python :: {bound[0]}.{bound[1]}" in classifiers
    tools = _pyproject()["tool"]
    assert tools["ruff"]["target-version"] == f"py{bound[0]}{bound[1]}"
    assert tools["mypy"]["python_version"] == f"{bound[0]}.{bound[1]}"


def test_torch_bound_is_the_torch_the_test_command_installs():
    (requirement,) = [r for r in _pyproject()["project"]["dependencies"] if r.startswith("torch")]
    bound = _version(requirement)
    script = (ROOT / "scripts" / "test.sh").read_text()
    (pinned,) = re.findall(r"pip install -q torch==([\d.]+)", script)
    assert bound == _version(pinned), (requirement, pinned)
    assert _version(torch.__version__) >= bound
