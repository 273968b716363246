"""The house rule: imports run one way (engine <- checkpoint <- integrations), and `import mics_hf` stays light.

Read from the source with `ast`, so a violation fails here even if nothing happens to execute the import.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mics_hf"

# wing -> the wings its modules may import (besides itself). Where a file lives decides its wing; top-level
# modules other than config.py and __init__.py (the CLI) may import anything.
ALLOWED = {
    "config": set(),
    "engine": {"config"},
    "checkpoint": {"config", "engine"},
    "integrations": {"config", "engine", "checkpoint"},
    "planning": {"config", "engine"},
    "emulation": {"config", "engine", "planning"},
    "__init__": {"config", "engine", "checkpoint"},
}


def _wing(module: str) -> str:
    parts = module.split(".")  # mics_hf.engine.shard -> engine; mics_hf.config -> config; mics_hf -> __init__
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, *, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) of every mics_hf import in `path`, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found += [(node.lineno, n) for n in names if n == "mics_hf" or n.startswith("mics_hf.")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("mics_hf")]
    return found


def violations(path: Path) -> list[str]:
    """Every import in `path` that runs against the one-way rule, as 'file:line imports module'."""
    module = _module_name(path)
    wing = _wing(module)
    if wing not in ALLOWED:  # the CLI: a tool at the top, may reach every wing (lazily)
        return []
    top_only = wing == "__init__"  # the package's __init__ loads integrations lazily, inside __getattr__
    bad = []
    for line, target in imports_of(path, top_level_only=top_only):
        target_wing = _wing(target)
        if target_wing != wing and target_wing not in ALLOWED[wing] and target != "mics_hf":
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
        if target == "mics_hf" and wing != "__init__":
            bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the mics_hf package itself (upward)")
    return bad


def test_imports_run_one_way():
    bad = [v for path in sorted(PACKAGE.rglob("*.py")) for v in violations(path)]
    assert not bad, "imports that run against engine <- checkpoint <- integrations:\n" + "\n".join(bad)


@pytest.mark.parametrize("wing", ["checkpoint", "integrations", "planning", "emulation"])
def test_rule_catches_an_engine_file_importing_upward(tmp_path, monkeypatch, wing):
    # A scratch copy of the package with one engine file importing from `wing`: the checker must flag it.
    scratch = tmp_path / "mics_hf"
    (scratch / "engine").mkdir(parents=True)
    (scratch / "engine" / "shard.py").write_text(f"from ..{wing} import something\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", scratch)
    assert violations(scratch / "engine" / "shard.py") == [f"mics_hf/engine/shard.py:1 imports mics_hf.{wing}"]


def test_every_module_has_a_wing():
    loose = sorted(
        str(p.relative_to(PACKAGE)) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "config", "cli")
    )
    assert not loose, f"modules outside the wings: {loose}; put each in engine/, checkpoint/, integrations/, planning/ or emulation/"


def test_import_mics_hf_loads_no_tool_or_integration():
    code = "import mics_hf, sys; print(sorted(m for m in sys.modules if m.startswith('mics_hf')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)  # a list of module names printed by the child
    heavy = [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in ("integrations", "planning", "emulation")]
    assert not heavy, f"`import mics_hf` loaded {heavy}"
    assert "mics_hf.engine.shard" in loaded and "mics_hf.checkpoint.load" in loaded
