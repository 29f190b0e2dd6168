"""Imports point down only (DESIGN.md, "Layers"): a walk over every import of src/latentdiff with `ast`.

A module may import its own layer and the layers below it, never one above. Imports inside functions
and under `if TYPE_CHECKING:` count too: a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "latentdiff"

# Top to bottom: a module may import from its own row and the rows below it. Each name is a top-level
# module or sub-package of latentdiff.
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),       # python -m latentdiff
    ("cli",),            # the command line (starts the server)
    ("server",),         # the web app
    ("pipelines",),      # generate, evaluate, demo, Stable Diffusion loading
    ("training",),       # trainers, run config, checkpoints, logs
    ("eval",),           # metrics
    ("models",),         # networks
    ("diffusion",),      # the math: schedules, samplers; no networks, no images
    ("nn",),             # building blocks
    ("data",),           # datasets, transforms, captions
    ("formats",),        # safetensors, JSON configs, key maps
    ("errors", "configs", "__init__"),  # UserError; the YAML presets' folder; the version
]
RANK = {name: len(LAYERS) - i for i, row in enumerate(LAYERS) for name in row}


def _layer(module: str) -> str:
    """The layer name of a dotted module inside latentdiff ('latentdiff.models.unet' -> 'models')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every latentdiff import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "latentdiff"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "latentdiff":
                continue
            if module == "latentdiff":  # `from latentdiff import training`: the names are modules
                out += [(node.lineno, f"latentdiff.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, module))
    return out


def arrows_up(root: Path = PACKAGE) -> list[str]:
    """Every import under ``root`` that points to a higher layer, as 'file:line: a -> b (module)'."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        here = _layer(_module_name(path, root))
        for line, module in _imports(path, root):
            there = _layer(module)
            if RANK[there] > RANK[here]:
                bad.append(f"{path.relative_to(root)}:{line}: {here} -> {there} ({module})")
    return bad


def test_every_layer_is_in_the_table():
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert names <= set(RANK), f"add to LAYERS: {sorted(names - set(RANK))}"


def test_imports_point_down_only():
    assert arrows_up() == []


def test_the_walk_sees_an_arrow_up(tmp_path):
    """The checker itself: a planted formats -> models import (relative and lazy) is reported."""
    fake = tmp_path / "latentdiff"
    (fake / "formats").mkdir(parents=True)
    (fake / "models").mkdir()
    for p in (fake / "__init__.py", fake / "formats" / "__init__.py", fake / "models" / "__init__.py"):
        p.write_text("")
    (fake / "formats" / "keys.py").write_text("def f():\n    from ..models import unet\n")
    (fake / "models" / "unet.py").write_text("from latentdiff.formats import keys\n")
    assert arrows_up(fake) == ["formats/keys.py:2: formats -> models (latentdiff.models)"]


@pytest.mark.parametrize("module,layer", [("latentdiff.models.unet", "models"), ("latentdiff.cli", "cli"),
                                          ("latentdiff", "__init__")])
def test_layer_of_a_module(module, layer):
    assert _layer(module) == layer
