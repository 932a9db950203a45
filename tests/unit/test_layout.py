"""The package's own rules, checked on its source: no private names across modules, no import
circles at import time, a small root API, and a light ``import tl_spikesink``."""

import ast
import subprocess
import sys
from pathlib import Path

import tl_spikesink as ts

PACKAGE = Path(ts.__file__).parent


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text())


def test_no_private_name_is_imported_from_another_module():
    found = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_spikesink"):
                found += [
                    f"{name}: from {node.module} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found, "\n".join(found)


def test_no_import_circle_between_modules_at_import_time():
    # Module-level imports only: an import inside a function is a deliberate lazy load.
    graph = {}
    for name, tree in _modules():
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_spikesink"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("tl_spikesink")}
        graph[name] = deps - {name}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    # A package importing its own submodules is how packages work, not a circle.
    cycles = []
    for name in graph:
        c = cycle_from(name)
        if c and not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(c, c[1:])):
            cycles.append(" -> ".join(c))
    assert not cycles, "\n".join(cycles)


def test_root_api_is_small_and_every_name_resolves():
    assert len(ts.__all__) <= 40
    for name in ts.__all__:
        assert getattr(ts, name) is not None


def test_moved_names_still_work_with_a_warning():
    import pytest

    with pytest.warns(DeprecationWarning, match="tl_spikesink.saes.train_sae"):
        assert ts.train_sae is ts.saes.train_sae
    with pytest.warns(DeprecationWarning, match="ablation_study"):
        assert ts.ablate is ts.training.ablation_study
    with pytest.warns(DeprecationWarning, match="plot_text_sink_scores"):
        ts.sink_scores_widget  # noqa: B018


def test_import_and_help_stay_light():
    code = (
        "import sys, tl_spikesink\n"
        "from tl_spikesink.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = ['torch', 'transformers', 'transformer_lens', 'plotly', 'circuitsvis', 'sae_lens']\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unit_tests_mirror_the_package():
    """Each folder of tests/unit names a subpackage; test basenames are unique, because pytest's
    default import mode imports a test file by its basename (the folders have no __init__.py)."""
    here = Path(__file__).parent
    folders = {p.name for p in here.iterdir() if p.is_dir() and p.name != "__pycache__"}
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert folders <= subpackages, folders - subpackages
    names = [p.name for p in here.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
