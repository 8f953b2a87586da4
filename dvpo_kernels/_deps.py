"""``python -m dvpo_kernels --deps``: installed dependency versions against the tested range.

The floor of each package is what the installed ``dvpo`` distribution declares
(``importlib.metadata.requires("dvpo")``, i.e. pyproject.toml); the newest versions CI has
run the tests with live in ``NEWEST_TESTED`` below, updated with each CI bump. A package
newer than tested is flagged ("run the tests on this release") but does not fail the check;
a required package that is missing or outside its declared range does, and so does an
installed optional one outside its range (it would be used).
"""
from __future__ import annotations

import importlib.metadata as md
from typing import Callable, NamedTuple

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

NEWEST_TESTED = {
    "torch": "2.13.0",
    "triton": "3.9.0",
    "transformers": "5.25.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "numpy": "2.4.6",
    "pyyaml": "6.0.4",
    "tqdm": "4.70.1",
    "peft": "0.21.2",
    "accelerate": "1.16.0",
    "gguf": "0.19.0",
    "pytest": "9.2.0",
}
# The groups a working install needs: the kernels' own dependencies and the trainer's.
REQUIRED_GROUPS = ("", "train")
DIST = "dvpo"


class Row(NamedTuple):
    name: str
    installed: str | None
    floor: str | None
    newest: str | None
    status: str
    failed: bool


def declared(requires: list[str], extras: list[str]) -> dict[str, dict[str, SpecifierSet]]:
    """package -> {group: specifiers} for the requirements that apply on this platform; group ""
    is the core dependencies, otherwise the extra that asks for the package."""
    out: dict[str, dict[str, SpecifierSet]] = {}
    for line in requires:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == DIST:
            continue
        for group in ("",) + tuple(extras):
            if req.marker is None or req.marker.evaluate({"extra": group}):
                out.setdefault(name, {})[group] = req.specifier
                break
    return out


def _floor(spec: SpecifierSet) -> Version | None:
    lows = [Version(s.version) for s in spec if s.operator in (">=", ">", "==", "~=")]
    return max(lows) if lows else None


def check(requires: list[str], extras: list[str], installed: Callable[[str], str | None],
          newest: dict[str, str] = NEWEST_TESTED) -> list[Row]:
    """One row per declared or tested package; ``installed(name)`` gives its version or None."""
    groups = declared(requires, extras)
    rows = []
    for name in sorted(set(groups) | set(newest)):
        specs = groups.get(name, {})
        required = any(g in specs for g in REQUIRED_GROUPS)
        # The most lenient declaration is the package's floor (e.g. triton for the kernels, not
        # the newer one the test extra pins).
        spec = min(specs.values(), key=lambda s: _floor(s) or Version("0"), default=SpecifierSet())
        floor = _floor(spec)
        version = installed(name)
        top = newest.get(name)
        if version is None:
            where = "required" if required else "optional" + (f", extra {sorted(specs)[0]}" if specs else "")
            status, failed = f"missing ({where})", required
        else:
            base = Version(Version(version).base_version)  # 2.13.0+cpu is 2.13.0
            if not spec.contains(base, prereleases=True):
                below = floor is not None and base < floor
                status, failed = ("below floor" if below else "outside declared range"), True
            elif top is not None and base > Version(top):
                status, failed = "newer than tested", False
            else:
                status, failed = "ok", False
        rows.append(Row(name, version, None if floor is None else str(floor), top, status, failed))
    return rows


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def main() -> int:
    try:
        meta = md.metadata(DIST)
    except md.PackageNotFoundError:
        print(f"the {DIST} distribution is not installed (pip install -e .), so its declared floors are unknown")
        return 1
    rows = check(md.requires(DIST) or [], meta.get_all("Provides-Extra") or [], _installed)
    print(f"{DIST} {meta['Version']}: installed versions against the declared floor and the newest tested")
    print(f"  {'package':<18} {'installed':<14} {'floor':<9} {'newest tested':<14} status")
    for r in rows:
        flag = "!" if r.failed else ("~" if r.status == "newer than tested" else " ")
        print(f"{flag} {r.name:<18} {r.installed or '-':<14} {r.floor or '-':<9} {r.newest or '-':<14} {r.status}")
    failed = [r.name for r in rows if r.failed]
    newer = [r.name for r in rows if r.status == "newer than tested"]
    if newer:
        print(f"~ newer than tested: {', '.join(newer)} (run the tests on this release)")
    print(f"! failed: {', '.join(failed)}" if failed else "all required dependencies within the declared range")
    return 1 if failed else 0
