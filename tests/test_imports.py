"""Every module of lora_jax imports on its own, and the package has no import cycle.

A cycle can hide behind an import inside a function (it works in the order the test suite happens to
import things, then breaks for a user who imports another module first), so the cycle check reads the
imports of every module, at module level and inside functions, from the source.
"""

import ast
import importlib.util
import json
import os
import pathlib
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import lora_jax


def _module_files() -> dict[str, pathlib.Path]:
    """``{module name: source file}`` for lora_jax and every module below it, found without importing."""
    root = pathlib.Path(importlib.util.find_spec("lora_jax").origin).parent
    out = {"lora_jax": root / "__init__.py"}

    def walk(path, prefix):
        for m in pkgutil.iter_modules([str(path)]):
            name = prefix + m.name
            if m.ispkg:
                out[name] = path / m.name / "__init__.py"
                walk(path / m.name, name + ".")
            else:
                out[name] = path / f"{m.name}.py"

    walk(root, "lora_jax.")
    return out


MODULES = _module_files()


def _run(*args, timeout=300, **env_vars):
    # Importing touches no device; the CPU platform keeps a subprocess from probing accelerators.
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), **env_vars}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


# One interpreter imports the third-party packages (most of an import's time), then forks a fresh child
# per module: each child imports that one lora_jax module first, as `python -c 'import NAME'` would.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    import flax.linen, jax, jax.numpy, numpy, optax  # noqa: F401 (imported once, before the forks)

    assert not [m for m in sys.modules if m.split(".")[0] == "lora_jax"]
    results = {}
    for name in sys.argv[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            try:
                importlib.import_module(name)
                message = ""
            except BaseException:
                message = traceback.format_exc()[-3000:] or "failed"
            os.write(write, message.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            message = f.read().decode(errors="replace")
        status = os.waitpid(pid, 0)[1]
        results[name] = message or ("" if status == 0 else f"the child ended with wait status {status}")
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def import_errors() -> dict[str, str]:
    """``{module: traceback of importing it first in a fresh interpreter, or ""}`` for every module."""
    proc = _run("-c", _IMPORT_EACH, *sorted(MODULES))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_imports_alone(name, import_errors):
    assert not import_errors[name], f"`python -c 'import {name}'` failed:\n{import_errors[name]}"


def test_import_check_sees_a_failing_import(tmp_path):
    """The check itself: a module that raises on import is reported with its traceback."""
    (tmp_path / "broken_mod.py").write_text("raise ImportError('boom')\n")
    proc = _run("-c", _IMPORT_EACH, "broken_mod", "lora_jax.core", PYTHONPATH=str(tmp_path))
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "boom" in results["broken_mod"] and results["lora_jax.core"] == "", results


def _imported_modules(name: str, file: pathlib.Path) -> set[str]:
    """The lora_jax modules whose import `file` triggers, from any import statement in it.

    ``from lora_jax.a import b`` counts lora_jax.a, the package lora_jax.a's parents, and lora_jax.a.b
    when that is a module; a module's own parent packages are left out (Python imports them first).
    """
    is_pkg = file.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets |= {mod} | {f"{mod}.{alias.name}" for alias in node.names}
    edges = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            if mod in MODULES and mod != name and not name.startswith(mod + "."):
                edges.add(mod)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = {name: _imported_modules(name, file) for name, file in MODULES.items()}
    cycles = _cycles(graph)
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in cycles]
    assert not cycles, f"import cycles (module: the modules of its cycle it imports): {detail}"


def test_cycle_check_sees_imports_inside_functions(tmp_path):
    """The check itself: an import inside a function counts, and a cycle it closes is found."""
    file = tmp_path / "fake.py"
    file.write_text("def f():\n    from lora_jax.core import merge\n    return merge\n")
    assert _imported_modules("lora_jax.fake", file) == {"lora_jax.core"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_lora_jax_leaves_heavy_submodules_lazy():
    """``import lora_jax`` (read with ``-X importtime``) loads none of the submodules it defers."""
    proc = _run("-X", "importtime", "-c", "import lora_jax")
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {
        line.rpartition("|")[2].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "lora_jax.transform" in loaded and "lora_jax.core" in loaded
    lazy = {f"lora_jax.{name}" for name in lora_jax._SUBMODULES}
    assert not loaded & lazy, sorted(loaded & lazy)
