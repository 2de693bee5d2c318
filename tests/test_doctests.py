"""The examples in the core's docstrings run: each module's doctests pass, and the modules that
show an example do have one (a doctest collector that finds none would pass silently)."""
import doctest
import importlib
import pkgutil

import pytest

import largebatch

CORE = sorted(m.name for m in pkgutil.walk_packages(largebatch.__path__, "largebatch."))
WITH_EXAMPLES = ("largebatch.reference", "largebatch.policy", "largebatch.trust", "largebatch.registry")


@pytest.mark.parametrize("name", CORE)
def test_core_doctests_pass(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0
    if name in WITH_EXAMPLES:
        assert result.attempted > 0


def test_the_core_imports_nothing_above_it():
    """Arrows point down: importing every core module loads no adapter, runner, launcher or framework."""
    import subprocess
    import sys
    code = ("import importlib, pkgutil, sys, largebatch\n"
            "for m in pkgutil.walk_packages(largebatch.__path__, 'largebatch.'): importlib.import_module(m.name)\n"
            "above = ('largebatch.torch', 'largebatch.keras', 'largebatch.launchers', 'largebatch.runner', "
            "'torch', 'tensorflow', 'keras', 'horovod')\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in above or n.startswith(above)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_core_module_imports_above_it_even_lazily():
    """Not even inside a function: the core's source names no adapter, runner or launcher import."""
    import ast
    from pathlib import Path
    above = ("largebatch.torch", "largebatch.keras", "largebatch.launchers", "largebatch.runner", "launchers",
             "frameworks")
    found = []
    for path in sorted(Path(largebatch.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{path.name}: {n}" for n in names if n in above or n.startswith(tuple(a + "." for a in above))]
    assert found == []
