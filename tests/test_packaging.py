"""The version bounds pyproject.toml declares are the ones .ci/bounds tests, and the lock satisfies them."""

from __future__ import annotations

from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
API_LIBRARIES = ("torch", "transformers", "peft", "hivemind")  # the libraries whose APIs the code calls into


def declared() -> dict[str, Requirement]:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {canonicalize_name(r.name): r for r in map(Requirement, dependencies)}


def pins(path: Path) -> dict[str, Version]:
    rows = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonicalize_name(name): Version(version) for name, version in (r.split("==") for r in rows if r)}


def lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert bounds, f"{requirement} declares no lower bound"
    return max(bounds)


def test_the_lowest_tested_versions_are_the_declared_lower_bounds():
    requirements, lowest = declared(), pins(REPO / ".ci" / "bounds-lowest.txt")
    assert sorted(lowest) == sorted(API_LIBRARIES)
    for name in API_LIBRARIES:
        assert lowest[name] == lower_bound(requirements[name]), (name, str(requirements[name]))


def test_the_highest_tested_versions_are_allowed_and_not_below_the_lowest():
    requirements, highest = declared(), pins(REPO / ".ci" / "bounds-highest.txt")
    lowest = pins(REPO / ".ci" / "bounds-lowest.txt")
    assert sorted(highest) == sorted(API_LIBRARIES)
    for name in API_LIBRARIES:
        assert requirements[name].specifier.contains(highest[name], prereleases=True), (name, str(highest[name]))
        assert highest[name] >= lowest[name]


def test_the_lock_pins_every_dependency_within_its_declared_range():
    requirements, locked = declared(), pins(REPO / "constraints.txt")
    for name, requirement in requirements.items():
        assert name in locked, f"constraints.txt does not pin {name}"
        assert requirement.specifier.contains(locked[name], prereleases=True), (name, str(locked[name]))
