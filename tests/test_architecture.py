"""The house in rooms: the package's import graph, read with ``ast`` from the source (lazy imports
inside functions included), has no cycle and no edge that points up; the light entry points load
only what they need; the wheel holds every module.

The rooms (docs/architecture.md): the runtime core (``runtime/*.py``) <- the embedded runtime
(``runtime/embedded``) <- the engine (``runtime/engine``) <- serving (``runtime/serving``); the
core <- the client (``runtime/client``); training and export on top; the command line and the
benchmarks inside export, at the top.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "specserve.runtime", "training": "specserve.training", "export": "specserve.export",
            "protos": "specserve.protos"}


def modules() -> dict[str, Path]:
    """Every module of the project by dotted name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as importing mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[1] == "runtime" and len(parts) == 2:
        return "runtime.core"
    if parts[1] == "runtime":
        return f"runtime.{parts[2]}" if len(parts) > 3 or (len(parts) == 3 and parts[2] in {
            "embedded", "engine", "serving", "client", "archive"}) else "runtime.core"
    return parts[1]


ALLOWED = {
    "runtime.core": {"runtime.core", "protos"},
    "runtime.embedded": {"runtime.core", "runtime.embedded"},
    "runtime.engine": {"runtime.core", "runtime.embedded", "runtime.engine"},
    "runtime.serving": {"runtime.core", "runtime.embedded", "runtime.engine", "runtime.serving", "protos"},
    "runtime.client": {"runtime.core", "runtime.client", "protos"},
    "runtime.archive": {"runtime.core", "runtime.embedded", "runtime.archive"},
    "protos": {"protos"},
    "training": {"runtime.core", "training"},
    "export": {"runtime.core", "runtime.embedded", "runtime.engine", "runtime.serving", "runtime.client",
               "runtime.archive", "training", "export", "protos"},
}
"""Which rooms each room may import. The core reaches protos in two places: ``wire.py`` (the
specserve.v1 Spectrum message) and ``layout.py``, which imports Triton's config schema only
when a config is written or read."""
EXCEPTIONS: set[tuple[str, str]] = set()


def test_rooms_are_what_the_layout_says():
    rooms = {room(m) for m in graph()}
    assert rooms == set(ALLOWED), rooms
    assert room("specserve.runtime.pipeline") == "runtime.core"
    assert room("specserve.runtime.engine") == "runtime.engine"
    assert room("specserve.runtime.serving.kserve") == "runtime.serving"
    assert room("specserve.runtime.embedded.local") == "runtime.embedded"


def test_no_import_points_up():
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps
                    if room(b) not in ALLOWED[room(a)] and (a, b) not in EXCEPTIONS)
    assert upward == []


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert strongly_connected(graph()) == []


def test_the_guard_sees_cycles_and_upward_edges():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    fake = {"specserve.runtime.pipeline": {"specserve.training.inputs"}}
    assert [b for a, deps in fake.items() for b in deps if room(b) not in ALLOWED[room(a)]]
    # lazy imports inside functions are edges too
    assert "specserve.export.commands" in graph()["specserve.export.cli"]


def _loaded_by(code: str) -> set[str]:
    script = textwrap.dedent(code) + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json

    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_client_loads_neither_the_engine_nor_onnxruntime():
    loaded = _loaded_by("import specserve.runtime.client, specserve.runtime.client.watch, specserve.runtime.wire")
    assert "grpc" in loaded and "specserve.runtime.client.client" in loaded
    heavy = {"onnxruntime", "prometheus_client", "torch", "specserve.runtime.engine", "specserve.runtime.serving"}
    assert heavy & loaded == set()


def test_serve_and_analyze_never_import_torch():
    loaded = _loaded_by("""
        from specserve.export import cli
        cli._parser()
        import specserve.runtime.serving.server
    """)
    assert "specserve.runtime.serving.server" in loaded and "onnxruntime" in loaded
    assert {m for m in loaded if m.split(".")[0] in {"torch", "onnx", "sklearn", "matplotlib"}} == set()


def test_tritonclient_and_every_specserve_module_load_in_one_process():
    names = sorted(m for m in modules() if not m.endswith("__main__"))
    loaded = _loaded_by("import tritonclient.grpc\n" + "\n".join(f"import {m}" for m in names))
    assert set(names) <= loaded and "tritonclient.grpc" in loaded


@pytest.mark.slow
def test_the_wheel_holds_every_module(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("specserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    inside = {n for n in names if n.endswith(".py")}
    expected = {str(Path(*name.split("."), "__init__.py") if path.name == "__init__.py"
                    else Path(*name.split(".")[:-1], path.name)) for name, path in modules().items()}
    assert expected - inside == set()
    # the shipped models are package data: an install without the source tree still has them
    from specserve.runtime.defaults import read_manifest

    shipped = {f"specserve/runtime/models/{rel}" for rel in read_manifest()["files"]}
    assert shipped and shipped | {"specserve/runtime/models/MANIFEST.json"} <= names


BLOCKER = """
import importlib.abc, sys
BLOCKED = ("grpc", "google.protobuf", "prometheus_client", "torch", "tritonclient", "specserve.runtime.engine",
           "specserve.runtime.serving", "specserve.runtime.client")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def test_the_embedded_runtime_runs_with_grpc_protobuf_prometheus_and_torch_blocked(tmp_path, kit):
    """``specserve analyze --local`` in a process where those imports fail: the embedded runtime
    reads the files, preprocesses, runs the sessions and writes the catalogue without them."""
    from test_contract_export import ToyFreeEnergy

    from specserve.export.onnx_export import export_model
    from specserve.export.repository import write_model
    from specserve.runtime.contract import ModelCard
    from specserve.runtime.preprocess import OPTICAL_PREPROCESSING

    c = ModelCard(kind="rbm", preprocessing=OPTICAL_PREPROCESSING, class_names=("non_cv", "cv"))
    report = export_model(ToyFreeEnergy(c.dims["n_pixels"]), c, tmp_path / "build" / "model.onnx",
                          atol=1e-5, rtol=1e-4)
    write_model(tmp_path / "repo", "rbm", 1, report.path, c)
    files = [str(p) for p in sorted((kit / "lamost_dr1/fits").glob("*.fits"))[:3]]
    out = tmp_path / "local.csv"
    script = BLOCKER + "from specserve.export.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.run([sys.executable, "-c", script, "analyze", "--local", "--repository", str(tmp_path / "repo"),
                           "--out", str(out), "--no-arena", *files], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from astropy.table import Table

    table = Table.read(out, format="ascii.csv")
    assert list(table["file"]) == files
    p_cv = [float(p) for p in table["p_cv"] if p == p]  # NaN: a spectrum that covers too little of the grid
    assert p_cv and all(0 <= p <= 1 for p in p_cv)


def test_the_install_layout_never_mixes_the_onnxruntime_builds():
    """Base install: numpy and astropy; the ONNX Runtime build comes only with [cpu] or [gpu];
    the server, training and development tools are extras; this environment holds one build."""
    from importlib import metadata

    requirements = metadata.requires("specserve")
    def project(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)

    base = sorted(project(r) for r in requirements if "extra ==" not in r)
    assert base == ["astropy", "numpy"]

    def extra(name: str) -> set[str]:
        return {project(r) for r in requirements if f'extra == "{name}"' in r}

    assert extra("cpu") == {"onnxruntime"} and extra("gpu") == {"onnxruntime-gpu"}
    for name in ("serve", "train", "dev"):
        assert not extra(name) & {"onnxruntime", "onnxruntime-gpu"}, name
    assert {"grpcio", "prometheus-client", "tritonclient"} <= extra("serve") and "torch" in extra("train")
    installed = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            installed.add(dist)
        except metadata.PackageNotFoundError:
            pass
    assert len(installed) == 1, installed
