#!/usr/bin/env python3
"""Dependency helper used while building the camex_ds Docker images.

pip cannot install a project's dependencies from ``pyproject.toml`` alone
(``pip install .`` needs the whole source tree).  To keep the expensive
dependency layers cacheable, the Dockerfiles copy only ``pyproject.toml`` and
this script first, turn ``[project].dependencies`` (plus chosen extras) into a
requirements file, install that, and only then copy the source.

Sub-commands (standard library only, except ``check`` which uses
``packaging``, a dependency of DeepSpeed and so present by then):

``requirements PYPROJECT [--extra NAME ...] [--exclude NAME ...]``
    Print one requirement per line.
``constraints [--prefix NAME ...]``
    Print ``name==version`` for every *installed* distribution whose
    normalised name equals or starts with one of the prefixes (default: the
    PyTorch stack: torch, torchvision, torchaudio, triton, nvidia-*).  Used as
    a pip constraints file so that nothing installed later can replace the
    base image's torch (e.g. with a different CUDA build from PyPI).
``check PYPROJECT [--extra NAME ...]``
    Fail (exit 1) unless every requirement of the project (and the extras) is
    installed at a version that satisfies it.  A targeted ``pip check`` that
    ignores unrelated breakage in the base image.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - the images use Python 3.11
    tomllib = None  # type: ignore[assignment]

DEFAULT_CONSTRAINT_PREFIXES = ("torch", "torchvision", "torchaudio", "triton", "nvidia-")


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not match:
        raise ValueError(f"cannot parse requirement {req!r}")
    return normalize(match.group(1))


def load_requirements(pyproject: Path, extras: list[str]) -> list[str]:
    if tomllib is None:
        raise SystemExit("Python >= 3.11 (tomllib) is required")
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    pending, seen = list(extras), set()
    while pending:  # an extra may name the project's own extras (`test = ["camex_ds[hf]"]`): expand them
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; have {sorted(optional)}")
        for req in optional[extra]:
            own = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\[([^\]]+)\]\s*", req)
            if own and normalize(own.group(1)) == normalize(project["name"]):
                pending.extend(e.strip() for e in own.group(2).split(","))
            else:
                reqs.append(req)
    return reqs


def cmd_requirements(args: argparse.Namespace) -> int:
    excluded = {normalize(n) for n in args.exclude}
    for req in load_requirements(Path(args.pyproject), args.extra):
        if requirement_name(req) not in excluded:
            print(req)
    return 0


def cmd_constraints(args: argparse.Namespace) -> int:
    prefixes = tuple(normalize(p) for p in (args.prefix or DEFAULT_CONSTRAINT_PREFIXES))
    found = {}
    for dist in metadata.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name and any(name == p or (p.endswith("-") and name.startswith(p)) for p in prefixes):
            found[name] = dist.version
    if "torch" in prefixes and "torch" not in found:
        print("torch is not installed; nothing to pin", file=sys.stderr)
        return 1
    for name in sorted(found):
        print(f"{name}=={found[name]}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from packaging.requirements import Requirement

    problems = []
    for line in load_requirements(Path(args.pyproject), args.extra):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (need {req})")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name}: installed {installed} does not satisfy {req}")
        else:
            print(f"ok  {req.name}=={installed}  ({req})")
    for problem in problems:
        print(f"ERR {problem}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("requirements", help="print requirements from pyproject.toml")
    p.add_argument("pyproject")
    p.add_argument("--extra", action="append", default=[])
    p.add_argument("--exclude", action="append", default=[])
    p.set_defaults(func=cmd_requirements)

    p = sub.add_parser("constraints", help="pin the installed torch stack")
    p.add_argument("--prefix", action="append", default=[])
    p.set_defaults(func=cmd_constraints)

    p = sub.add_parser("check", help="verify the installed versions satisfy pyproject.toml")
    p.add_argument("pyproject")
    p.add_argument("--extra", action="append", default=[])
    p.set_defaults(func=cmd_check)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
