"""Print a pip constraints file that pins every dependency of pyproject.toml at its floor.

`make check-floors` installs the package with it into a separate environment and runs the
tests, which is how the floors in pyproject.toml are known to work. Packages that cannot be
installed at their floor on this machine (torch and torchvision come from local CUDA builds)
keep the version of constraints.txt and are named on stderr.

    python tools/floor_constraints.py [--keep torch torchvision] > floors.txt
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# name>=version, optionally with an environment marker after ';'
FLOOR = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*>=\s*([^,;\s]+)\s*$")


def floors(pyproject: Path) -> dict[str, str]:
    """{package: floor} of [project.dependencies]; a dependency without one is an error."""
    found = {}
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = FLOOR.match(requirement.split(";")[0])
        if match is None:
            raise SystemExit(f"{pyproject}: {requirement!r} is not `name>=version` (a floor "
                             "and nothing else: upper bounds belong in constraints.txt)")
        found[match.group(1).lower()] = match.group(2)
    return found


def pinned(constraints: Path) -> dict[str, str]:
    """{package: version} of a `name==version` constraints file."""
    out = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[name.lower()] = version
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", nargs="*", default=["torch", "torchvision"],
                        help="packages pinned at constraints.txt's version instead")
    parser.add_argument("--with", dest="extra", nargs="*", default=["pytest", "pytest-xdist"],
                        help="test tools, pinned at constraints.txt's version")
    args = parser.parse_args(argv)
    tested = pinned(ROOT / "constraints.txt")
    lines = []
    for name, floor in floors(ROOT / "pyproject.toml").items():
        if name in args.keep:
            print(f"{name}: floor {floor} not installable here, using {tested[name]}",
                  file=sys.stderr)
            lines.append(f"{name}=={tested[name]}")
        else:
            lines.append(f"{name}=={floor}")
    lines += [f"{name}=={tested[name]}" for name in args.extra if name in tested]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
