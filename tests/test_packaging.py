"""pyproject.toml declares what requirements.txt installs (runtime and test sections)."""
from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _requirements() -> dict:
    sections, current = {"runtime": [], "tests": []}, None
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.startswith("# Runtime"):
            current = "runtime"
        elif line.startswith("# Tests"):
            current = "tests"
        elif line.strip() and not line.startswith("#"):
            assert current is not None, f"requirement {line!r} before any section comment"
            sections[current].append(line.strip())
    return sections


def test_pyproject_declares_the_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    req = _requirements()
    assert req["runtime"], "requirements.txt lists no runtime dependency"
    assert sorted(project["dependencies"]) == sorted(req["runtime"])
    assert sorted(project["optional-dependencies"]["test"]) == sorted(req["tests"])


def test_tpu_extra_matches_requirements_tpu():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [x.strip() for x in (ROOT / "requirements-tpu.txt").read_text().splitlines()
             if x.strip() and not x.startswith("#") and not x.startswith("-r")]
    assert sorted(project["optional-dependencies"]["tpu"]) == sorted(lines)
