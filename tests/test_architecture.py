"""The package's shape: an acyclic import graph, commands above the library, one name per
module, no file over 600 lines, the maths apart from the data."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import fsre_lightning
from fsre_lightning.runtime import COMMANDS

PACKAGE = Path(fsre_lightning.__file__).parent
ROOT = PACKAGE.parents[1]
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> set[str]:
    """Every fsre_lightning module `name` imports, at the top or inside a function."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            # `from package import submodule` imports the submodule
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}
CLI = {f"fsre_lightning.{c}" for c in COMMANDS}


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_no_library_module_imports_a_command() -> None:
    offenders = {m: sorted(GRAPH[m] & CLI) for m in MODULES if m not in CLI and GRAPH[m] & CLI}
    assert not offenders, offenders


def test_every_command_runs_as_a_module_and_returns_an_exit_status() -> None:
    for command in COMMANDS:
        assert importlib.util.find_spec(f"fsre_lightning.{command}") is not None
        source = MODULES[f"fsre_lightning.{command}"].read_text()
        assert ("def main(argv: Sequence[str] | None = None) -> int:" in source
                or f'hydra_command("{command}"' in source), command
        assert 'if __name__ == "__main__":\n    sys.exit(main())' in source, command


def test_the_hydra_entry_block_is_written_once() -> None:
    uses = {name: text.count("hydra.main(") for name, path in MODULES.items()
            if (text := path.read_text()).count("hydra.main(")}
    assert uses == {"fsre_lightning.hydra_entry": 1}, uses


def test_no_two_modules_share_a_file_name() -> None:
    names: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            names.setdefault(path.stem, []).append(name)
    assert not {k: v for k, v in names.items() if len(v) > 1}


def test_no_file_is_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_maths_imports_nothing_from_the_data() -> None:
    data = {m for m in MODULES if m.startswith("fsre_lightning.data")}
    for maths in ("fsre_lightning.geometry", "fsre_lightning.objective"):
        assert not GRAPH[maths] & data, (maths, GRAPH[maths] & data)


def test_sources_cite_the_design_notes_not_an_outside_document() -> None:
    assert (ROOT / "docs" / "design.md").is_file()
    outside = "S" "PEC"  # the name of the private reference, split so this file lacks it too
    texts = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]
    citing = [str(p.relative_to(ROOT)) for p in texts if outside in p.read_text()]
    assert not citing, citing


def test_commands_import_neither_torch_nor_lightning_until_their_work_starts() -> None:
    """Help, usage errors, --cfg and the config checks answer in a second (issue 29): no command
    module, nor what the config checks read, imports torch, timm or Lightning at import."""
    import subprocess
    import sys

    code = ("import sys\n"
            f"for c in {list(COMMANDS)!r}: __import__('fsre_lightning.' + c)\n"
            "import fsre_lightning.config.preflight, fsre_lightning.data.kitti_config\n"
            "import fsre_lightning.data.video_folder_config, fsre_lightning.module_config\n"
            "import fsre_lightning.loss_config, fsre_lightning.models.network_config\n"
            "print(sorted(m for m in ('torch', 'timm', 'pytorch_lightning', 'kornia')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
