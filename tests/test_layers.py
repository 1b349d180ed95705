"""The layers of docs/ARCHITECTURE.md hold: no module imports a higher layer, not even inside a function.

`layer_violations` parses every module of a package tree (ast, every import statement wherever
it sits, relative imports resolved) and names each import of a higher layer. The first test runs
it on the package; the others plant violations in a synthetic tree to show that it catches them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top, as docs/ARCHITECTURE.md draws them. A module may import its own layer and the
# layers below it. The base modules are pipeline/<name>.py; the others are subpackages.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "rng", "atomic", "scrub", "names", "flags", "machine", "unpickle"),
    ("config",),
    ("data",),
    ("models",),
    ("diffusion",),
    ("training",),
    ("defenses", "attacks"),
    ("protocol",),
    ("store",),
    ("runtime",),
    ("analytics",),
    ("bench",),
    ("cli",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}

# Imports that break the order and are being removed, as (importer, imported module); each must
# still exist (the test fails once one is gone, so that the entry goes with it). None today.
PENDING: set[tuple[str, str]] = set()


def module_name(root: Path, path: Path) -> str:
    """pipeline/models/zoo.py -> pipeline.models.zoo (a package's __init__ is the package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module `path` imports, at any depth of its code (functions, classes, conditionals)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            if layer_of(target) is None:  # `from pipeline import rng`: the names are the modules
                found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def layer_of(module: str) -> str | None:
    """The layer key of a pipeline module: its subpackage or base module; None for `pipeline` itself
    or for a name that is not a module of ours (`from pipeline import __version__`)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "pipeline":
        return None
    return parts[1]


def layer_violations(root: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """((importer, imported) pairs where a lower layer imports a higher one, modules of no known layer)."""
    bad, unknown = [], []
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        own = layer_of(module)
        if own is None:
            continue
        if own not in RANK:
            unknown.append(module)
            continue
        for target in sorted(imported_modules(path, module)):
            other = layer_of(target)
            if other in RANK and RANK[other] > RANK[own]:
                bad.append((module, target))
    return bad, unknown


def test_no_lower_layer_imports_a_higher_one():
    bad, unknown = layer_violations(REPO / "pipeline")
    assert not unknown, f"modules in no layer (add the package to LAYERS and docs/ARCHITECTURE.md): {unknown}"
    found = set(bad)
    new = sorted(found - PENDING)
    assert not new, "lower layers import higher ones: " + "; ".join(f"{m} imports {t}" for m, t in new)
    gone = sorted(PENDING - found)
    assert not gone, f"no longer imported, remove from PENDING: {gone}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pipeline"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in {p.parent for p in root.rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root


def test_the_checker_catches_an_upward_import_hidden_in_a_function(tmp_path):
    root = _tree(tmp_path, {
        "models/zoo.py": "def default():\n    from pipeline.training.diffusion import train\n    return train\n",
        "training/diffusion.py": "from pipeline.models import zoo\n\ndef train():\n    pass\n",
    })
    bad, unknown = layer_violations(root)
    assert bad == [("pipeline.models.zoo", "pipeline.training.diffusion")] and unknown == []


def test_the_checker_resolves_relative_imports_and_module_names(tmp_path):
    root = _tree(tmp_path, {
        "store/io.py": "from ..runtime import run\n",            # up: store is below runtime
        "data/__init__.py": "from . import digits\n",              # own package: fine
        "data/digits.py": "import pipeline.errors\n",              # down: fine
        "rng.py": "from pipeline import cli\n",                    # base importing the top
        "analytics/report.py": "from pipeline import store, rng\n",  # down: fine
    })
    bad, _ = layer_violations(root)
    assert sorted(bad) == [("pipeline.rng", "pipeline.cli"), ("pipeline.store.io", "pipeline.runtime")]


def test_the_checker_reports_a_package_of_no_layer(tmp_path):
    root = _tree(tmp_path, {"plugins/extra.py": "import os\n"})
    assert layer_violations(root) == ([], ["pipeline.plugins", "pipeline.plugins.extra"])


@pytest.mark.parametrize("planted", ["import pipeline.cli", "from pipeline.bench.elbo import bench_elbo"])
def test_a_violation_planted_in_a_copy_of_the_package_fails(tmp_path, planted):
    import shutil

    copy = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline", copy, ignore=shutil.ignore_patterns("__pycache__"))
    zoo = copy / "models" / "zoo.py"
    zoo.write_text(zoo.read_text() + f"\n\ndef _planted():\n    {planted}\n")
    bad, _ = layer_violations(copy)
    assert any(m == "pipeline.models.zoo" and t.startswith(planted.split()[1]) for m, t in bad)


def _defense_modules(path: Path) -> set[str]:
    """The pipeline.defenses modules `path` imports, `from pipeline.defenses import rdc` included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = "pipeline.defenses" if node.level == 1 and not node.module else \
                f"pipeline.defenses.{node.module}" if node.level == 1 else node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m.removeprefix("pipeline.defenses.").split(".")[0] for m in found if m.startswith("pipeline.defenses.")}


def test_the_elbo_engine_imports_nothing_of_rdc():
    """elbo.py is the engine any ELBO-scoring defense hands its equations to; RDC is one such
    defense, so the engine must not know it (rdc.py imports elbo.py, never the other way)."""
    defenses = REPO / "pipeline" / "defenses"
    assert "elbo" in _defense_modules(defenses / "rdc.py")  # the check sees imports of either form
    assert "rdc" not in _defense_modules(defenses / "elbo.py")


def test_how_the_network_runs_lives_in_execution_not_a_second_engine():
    defenses = REPO / "pipeline" / "defenses"
    assert (defenses / "execution.py").is_file() and not (defenses / "engine.py").exists()


def layer_graph(root: Path) -> dict[str, set[str]]:
    """Which other layers each layer imports directly (base modules grouped as "base")."""
    def group(layer: str) -> str:
        return "base" if RANK[layer] == 0 else layer

    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(root, path)
        own = layer_of(module)
        if own not in RANK:
            continue
        edges = graph.setdefault(group(own), set())
        for target in imported_modules(path, module):
            other = layer_of(target)
            if other in RANK and group(other) != group(own):
                edges.add(group(other))
    return graph


def documented_graph(text: str) -> dict[str, set[str]]:
    """The table under "## Layers" in docs/ARCHITECTURE.md: | layer | imports | ... |."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    graph = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`") and cells[0] != "`layer`":
            graph[cells[0].strip("`")] = {w.strip("`") for w in cells[1].replace(",", " ").split() if w != "-"}
    return graph


def test_architecture_draws_the_real_dependency_graph():
    """The layer table of docs/ARCHITECTURE.md lists, per layer, exactly the layers it imports."""
    documented = documented_graph((REPO / "docs" / "ARCHITECTURE.md").read_text())
    real = layer_graph(REPO / "pipeline")
    assert documented == real, "docs/ARCHITECTURE.md's layer table differs from the imports: " + "; ".join(
        f"{k}: documented {sorted(documented.get(k, ()))}, imports {sorted(real.get(k, ()))}"
        for k in sorted(set(documented) | set(real)) if documented.get(k) != real.get(k))


def test_the_documented_graph_is_read_from_the_table():
    text = "## Layers\n\n| layer | imports |\n|---|---|\n| `cli` | `runtime`, `base` |\n| `base` | - |\n\n## Next\n| `x` | `y` |\n"
    assert documented_graph(text) == {"cli": {"runtime", "base"}, "base": set()}
