"""The release artefacts: the wheel and sdist build, pass ``twine check``, hold what they should,
and the wheel installed into a clean virtual environment runs the quickstart."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_VERSION_LINE = re.search(
    r'^__version__ = "([^"]+)"$', (ROOT / "src/taskbalance/__init__.py").read_text(), re.M
)
VERSION = _VERSION_LINE[1] if _VERSION_LINE else ""


def run_checked(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Runs ``command`` (up to 10 minutes) and returns its stdout; fails the test, showing
    both streams, on a non-zero exit."""
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # No build isolation: hatchling comes from the dev extra, so the build needs no index.
    run_checked(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], ROOT
    )
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1, sorted(p.name for p in out.iterdir())
    assert len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_version_lives_in_one_place() -> None:
    assert VERSION, "src/taskbalance/__init__.py must set __version__ = '...'"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"^version\s*=", pyproject, re.M) is None  # no second copy
    assert 'dynamic = ["version"]' in pyproject


@pytest.mark.slow
def test_twine_check_passes(artefacts: dict[str, Path]) -> None:
    output = run_checked(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, artefacts.values())], ROOT
    )
    assert output.count("PASSED") == 2, output


@pytest.mark.slow
def test_wheel_holds_the_package_only(artefacts: dict[str, Path]) -> None:
    assert artefacts["wheel"].name == f"taskbalance-{VERSION}-py3-none-any.whl"
    names = zipfile.ZipFile(artefacts["wheel"]).namelist()
    dist_info = f"taskbalance-{VERSION}.dist-info/"
    strays = [n for n in names if not n.startswith(("taskbalance/", dist_info))]
    assert strays == []
    assert "taskbalance/py.typed" in names
    assert "taskbalance/methods/_upgrad.py" in names
    assert not [n for n in names if re.search(r"(^|/)(tests?|docs|examples)/|\.png$|\.csv$", n)]
    metadata = zipfile.ZipFile(artefacts["wheel"]).read(dist_info + "METADATA").decode()
    assert f"Version: {VERSION}" in metadata
    assert "Project-URL" not in metadata  # none until the project has a public home
    assert "Classifier: License :: OSI Approved :: MIT License" in metadata
    assert "Requires-Dist: torch>=" in metadata


@pytest.mark.slow
def test_sdist_holds_the_sources_and_tests(artefacts: dict[str, Path]) -> None:
    with tarfile.open(artefacts["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for expected in ("pyproject.toml", "LICENSE", "src/taskbalance/__init__.py", "mkdocs.yml"):
        assert expected in names
    assert any(name.startswith("tests/") for name in names)
    assert not any(name.startswith(("runs/", "site/", ".venv/")) for name in names)


@pytest.mark.slow
def test_wheel_installs_into_a_clean_venv_and_runs_the_quickstart(
    artefacts: dict[str, Path], tmp_path: Path
) -> None:
    environment = tmp_path / "venv"
    # A venv without system site-packages: nothing from the test environment leaks in.
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(environment)
    python = str(environment / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # torch first, exactly as scripts/test.sh does, so the wheel's torch>= requirement is met
    # by the CPU build and nothing pulls CUDA wheels.
    run_checked([python, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, env)
    run_checked([python, "-m", "pip", "install", "-q", str(artefacts["wheel"])], tmp_path, env)
    where = run_checked(
        [python, "-c", "import taskbalance as tb; print(tb.__file__, tb.__version__)"],
        tmp_path,
        env,
    )
    location, version = where.split()
    assert Path(location).is_relative_to(environment), location  # the wheel, not the checkout
    assert version == VERSION
    output = run_checked([python, str(ROOT / "examples" / "quickstart.py")], tmp_path, env)
    learned = re.search(r"learned exp\(s\)\s*:\s*([\d.]+)\s+([\d.]+)", output)
    assert learned is not None, output
    # True noise variances 0.25 and 4: uncertainty weighting recovers them.
    assert float(learned[1]) == pytest.approx(0.25, rel=0.1)
    assert float(learned[2]) == pytest.approx(4.0, rel=0.1)
