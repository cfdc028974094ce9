"""Imports point one way (shared/DESIGN.md, "Layers"): a lower layer never imports a higher one.

    top        rlhf's stage controllers (rlhf/training.py: sft's and rm's shared one) and CLI (TOP below)
    actors/    one file per Ray role
    cluster/   where things run
    library    rlhf's helpers the layers above share (judge, generation, deepspeed_setup, inference, ...)
    bottom     rlhf/algorithms, rlhf/data, rlhf/models, rlhf/config, rlhf/paths: pure Python and torch, no Ray

Every import counts, a function's own imports too (that is where a cycle would hide).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP = {"rlhf.cli", "rlhf.cli_jobs", "rlhf.pipeline", "rlhf.sft", "rlhf.rm", "rlhf.training", "rlhf.pairs",
       "rlhf.ppo", "rlhf.eval", "rlhf.serve", "rlhf.bench"}
BOTTOM = ("rlhf.algorithms", "rlhf.data", "rlhf.models", "rlhf.config", "rlhf.paths")


def _modules() -> dict[str, Path]:
    files = [*REPO.glob("rlhf/**/*.py"), *REPO.glob("actors/*.py"), *REPO.glob("cluster/*.py")]
    names = {}
    for path in files:
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _layer(module: str) -> str:
    if module == "rlhf" or any(module == b or module.startswith(b + ".") for b in BOTTOM):
        return "bottom"
    if module in TOP:
        return "top"
    root = module.split(".")[0]
    return {"actors": "actors", "cluster": "cluster", "rlhf": "library"}.get(root, "outside")


ALLOWED = {  # what each layer may import from the project (and Ray, for all but the bottom)
    "bottom": {"bottom"},
    "library": {"bottom", "library"},
    "cluster": {"bottom", "library", "cluster"},
    "actors": {"bottom", "library", "cluster", "actors"},
    "top": {"bottom", "library", "cluster", "actors", "top"},
}


def test_imports_point_down():
    wrong = []
    for module, path in sorted(_modules().items()):
        layer = _layer(module)
        for imported in sorted(_imports(path)):
            target = _layer(imported)
            if target == "outside":
                if layer == "bottom" and imported.split(".")[0] == "ray":
                    wrong.append(f"{module} ({layer}) imports ray")
                continue
            if target not in ALLOWED[layer]:
                wrong.append(f"{module} ({layer}) imports {imported} ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path, monkeypatch):
    """The test above would fail on a bottom module importing a controller."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from rlhf.ppo import run\n")
    assert "rlhf.ppo" in _imports(bad) and _layer("rlhf.ppo") not in ALLOWED[_layer("rlhf.config")]
