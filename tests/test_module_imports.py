"""No two modules of the project import each other (lazy imports inside functions included):
the layers' arrows point one way (core -> adapters -> runner/launchers -> bench)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"largebatch": "largebatch", "frameworks/torch": "largebatch.torch", "frameworks/keras": "largebatch.keras",
            "launchers": "largebatch.launchers", "launchers/runner": "largebatch.runner"}


def modules():
    """{dotted module name: path} as setup.py's package_dir installs them."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).glob("*.py"):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    for path in (ROOT / "largebatch" / "config").glob("*.py"):
        out["largebatch.config" if path.stem == "__init__" else f"largebatch.config.{path.stem}"] = path
    return out


def imports_of(name, path, known):
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_two_modules_import_each_other():
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert len(graph) > 60 and graph["largebatch.launchers.cli"]            # the walk found the code
    mutual = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                     if a in graph.get(b, ()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert mutual == []
