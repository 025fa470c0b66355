"""The package's layers: every import points down, and no private name crosses a package.

Walks the AST of every module under src/memopt (imports inside functions included) and checks each
import of a memopt module against the order in the README's layout section. A unit is a top-level
package or module of memopt (``memopt.quant``, ``memopt.evaluate``); a unit may import itself and
the units of lower layers, never one of its own layer or above. ``memopt/__init__.py`` (the public
API) and ``memopt/__main__.py`` sit above everything and nothing imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "memopt"

# lowest first; units on one line form one layer and may not import each other
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("formats",),
    ("weights",),
    ("models",),
    ("step",),
    ("measure",),
    ("engine",),
    ("evaluate", "generate"),
    ("quant",),
    ("prune",),
    ("plan", "stream", "train"),
    ("distill",),
    ("keras",),
    ("compose",),
    ("report",),
    ("app",),
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every memopt import in the file, anywhere in it."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "memopt" or target.startswith("memopt."):
                names = [a.name for a in node.names]
                # "from memopt.x import y" may name a submodule y: count it as memopt.x.y
                out.append((node.lineno, target, names))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("memopt"):
                    out.append((node.lineno, alias.name, []))
    return out


MODULES = sorted(SRC.rglob("*.py"))


def test_every_unit_has_a_layer() -> None:
    units = {_unit(_module_name(p)) for p in MODULES} - {"", "__main__"}
    assert units <= set(RANK), f"units without a layer: {sorted(units - set(RANK))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    me = _module_name(path)
    unit = _unit(me)
    bad = []
    for line, target, names in _imports(path):
        if target == "memopt" and me in ("memopt", "memopt.__main__"):
            continue
        there = _unit(target)
        if me in ("memopt", "memopt.__main__"):
            continue  # the public API and the entry point import from anywhere
        if target == "memopt" or there == "__main__":
            bad.append(f"line {line}: imports the package root {target}")
            continue
        if there == unit:
            continue
        if RANK[there] >= RANK[unit]:
            bad.append(f"line {line}: {me} ({unit}) imports {target} ({there}), not below it")
        private = [n for n in names if n.startswith("_")]
        if private:
            bad.append(f"line {line}: private names {private} from {target}")
    assert not bad, "\n".join(bad)
