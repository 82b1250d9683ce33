"""The house: imports only point down (docs/design.md, "Layers"), and there is one import name.

Every ``import`` in the package is read (function-level imports too): an edge from one room to
another must go to a lower layer; rooms of one layer (compile and runtime, passes and backends)
never import each other; and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "cachecompile"

# room → layer; a module's room is its first path part under cachecompile/ (a top-level module is
# its own room). Lower layers never import higher ones.
LAYERS = {
    "core": 0, "sampling": 0, "models": 0,
    "passes": 1, "backends": 1,
    "methods": 2,
    "compile": 3, "runtime": 3,
    "api": 4, "__init__": 4,
    "tools": 5,
    "__main__": 6,
}
# Top-level modules that belong to a room of their own name's layer: the public calls.
ROOMS = {"pipelines": "api", "calibration": "api"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    room = "__init__" if len(parts) == 1 else parts[1]
    return ROOMS.get(room, room)


def _imports() -> dict[str, set[str]]:
    """module → the cachecompile modules it imports (``from a import b`` counts ``a.b`` when that
    is a module, else ``a``)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t.split(".")[0] == "cachecompile" and t != name}
        graph[name] = {d for d in deps if d in modules}
    return graph


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in _imports()}
    assert rooms <= set(LAYERS), f"rooms without a layer: {sorted(rooms - set(LAYERS))}"


def test_imports_only_point_down():
    upward = []
    for module, deps in _imports().items():
        for dep in deps:
            a, b = _room(module), _room(dep)
            if a == b or (b == "__init__" and LAYERS[a] == LAYERS["tools"]):
                continue  # within a room; the tools use the public package
            if LAYERS[b] >= LAYERS[a]:
                upward.append(f"{module} ({a}, layer {LAYERS[a]}) imports {dep} ({b}, layer {LAYERS[b]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_core_imports_nothing_above_it():
    graph = _imports()
    for module, deps in graph.items():
        if _room(module) == "core":
            assert all(_room(d) == "core" for d in deps), (module, deps)


def test_installed_wheel_works_beside_user_packages_named_runtime_and_passes(tmp_path):
    """One import name: a user's own ``runtime`` and ``passes`` packages do not shadow ours."""
    root = PACKAGE.parent
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(root)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    site = tmp_path / "site"
    (wheel,) = wheels.glob("cachecompile-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    user = tmp_path / "project"
    for pkg in ("runtime", "passes"):
        (user / pkg).mkdir(parents=True)
        (user / pkg / "__init__.py").write_text("MINE = True\n")
    script = textwrap.dedent("""
        import torch, runtime, passes, cachecompile as cc
        from diffusers import DiTTransformer2DModel
        assert runtime.MINE and passes.MINE
        assert cachecompile_dir in cc.__file__, cc.__file__
        torch.manual_seed(0)
        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
        kw = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]), class_labels=torch.tensor([1, 2]))
        with torch.no_grad():
            assert torch.equal(cc.optimize(m, cc.Schedule.fora(2, 1))(**kw).sample, m(**kw).sample)
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(user), str(site)])
    out = subprocess.run([sys.executable, "-c", f"cachecompile_dir = {str(site)!r}\n" + script],
                         cwd=user, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
