"""The layer rule of DESIGN.md, checked on the source: imports point down the layers, never in a circle.

Every module of python/tstitch_trt is parsed with ast; every import of a tstitch_trt module counts,
function-level and TYPE_CHECKING ones included (a lazy import is still a dependency: it runs the first
time that function does). Three rules:

1. no import circle between modules;
2. no upward import: a module imports only its own layer and the layers below it (LAYERS, top first);
3. the no-torch layers (serve, runtime, sampling, bundle and the helpers under them) never import torch
   or the torch stack, nor a build-time module; cli and pipeline import torch only inside functions,
   so `tstitch-trt run` on an ONNX / TensorRT bundle never loads it.

The checker is tested on a synthetic package with planted violations, so it cannot pass by seeing none.
"""

from __future__ import annotations

import ast
import fnmatch
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "python"

# Top to bottom (docs/ARCHITECTURE.md draws the same picture). "x" is the module x itself, "x.*" its
# submodules. Build-time code (export, models, eval, the demo's trainer) sits above the pipeline: it
# drives pipelines (quality sweeps, the bf16 gate, `check`), and nothing at or below the pipeline may
# need it, except the two documented lazy openings of the torch backend in ALLOWED_UPWARD.
LAYERS: list[tuple[str, list[str]]] = [
    ("cli", ["tstitch_trt.cli", "tstitch_trt.cli.*"]),
    ("command back-ends", ["tstitch_trt.bench", "tstitch_trt.bench.*", "tstitch_trt.recipes"]),
    ("serve", ["tstitch_trt.serve", "tstitch_trt.serve.*"]),
    ("build-time (torch)", ["tstitch_trt.export", "tstitch_trt.export.*", "tstitch_trt.models",
                            "tstitch_trt.models.*", "tstitch_trt.eval", "tstitch_trt.eval.*", "tstitch_trt.demo.*"]),
    ("pipeline", ["tstitch_trt.pipeline", "tstitch_trt.pipeline.*"]),
    ("runtime", ["tstitch_trt.runtime", "tstitch_trt.runtime.*"]),
    # tstitch_trt.demo itself only says where the shipped demo bundle is (no torch)
    ("sampling, bundle", ["tstitch_trt.sampling", "tstitch_trt.sampling.*", "tstitch_trt.bundle",
                          "tstitch_trt.bundle.*", "tstitch_trt.demo"]),
    ("helpers", ["tstitch_trt.argtypes", "tstitch_trt.outputs", "tstitch_trt.progress", "tstitch_trt.quiet"]),
    ("base", ["tstitch_trt.errors", "tstitch_trt"]),
]
NO_TORCH = ("serve", "runtime", "sampling, bundle", "helpers", "base")
TORCH_ONLY_IN_FUNCTIONS = ("cli", "pipeline")
BUILD_TIME = "build-time (torch)"
TORCH_STACK = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate")

# (importer, imported) -> why this upward import is right; each must be inside a function
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("tstitch_trt.pipeline.backends", "tstitch_trt.export.torch_backend"):
        "the torch backend IS the StepModule (export/); `--backend torch` opens it by name",
    ("tstitch_trt.pipeline.text_encoder", "tstitch_trt.export.unet_export"):
        "a torch bundle's text encoder is the exported TextEncoder module itself",
}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # a module of the package, or a third-party top-level name
    line: int
    in_function: bool


def modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every .py under root/package."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


class _Collector(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, known: dict[str, Path], package: str) -> None:
        self.name, self.known, self.package = name, known, package
        self.base = name.split(".") if is_package else name.split(".")[:-1]  # what `from .` means
        self.depth = 0
        self.found: list[Import] = []

    def _func(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _func

    def _add(self, target: str, node: ast.stmt) -> None:
        if target == self.package or target.startswith(self.package + "."):
            # the deepest module of the package the dotted name reaches (a name may be a function, a class)
            while target not in self.known and "." in target:
                target = target.rsplit(".", 1)[0]
        else:
            target = target.split(".")[0]
        self.found.append(Import(self.name, target, node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.base[:len(self.base) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            # `from pkg import sub` imports the submodule sub; `from mod import name` imports mod
            self._add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in self.known else module, node)


def imports(root: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    known = modules(root, package)
    found: list[Import] = []
    for name, path in known.items():
        c = _Collector(name, path.name == "__init__.py", known, package)
        c.visit(ast.parse(path.read_text(), str(path)))
        found += [i for i in c.found if i.imported != name]
    return known, found


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> str | None:
    hits = [name for name, patterns in layers for p in patterns if fnmatch.fnmatchcase(module, p)]
    if len(hits) > 1:
        raise AssertionError(f"{module} matches layers {hits}: make LAYERS' patterns disjoint")
    return hits[0] if hits else None


def circles(known: dict[str, Path], found: list[Import]) -> list[list[str]]:
    """Every strongly connected set of two or more modules, as one circle through it (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in known}
    for i in found:
        if i.imported in known:
            graph[i.importer].add(i.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    def path(group: list[str]) -> list[str]:  # a circle from group[0] back to itself, inside the group
        start, members = group[0], set(group)
        seen, todo = {start: [start]}, [start]
        while todo:
            v = todo.pop(0)
            for w in sorted(graph[v] & members):
                if w == start:
                    return seen[v] + [start]
                if w not in seen:
                    seen[w] = seen[v] + [w]
                    todo.append(w)
        raise AssertionError("unreachable: a strongly connected group has a circle")

    return [path(g) for g in groups]


def violations(root: Path, package: str, layers: list[tuple[str, list[str]]], no_torch: tuple[str, ...],
               torch_only_in_functions: tuple[str, ...], build_time: str,
               allowed: dict[tuple[str, str], str]) -> list[str]:
    """One line per broken rule (empty: the package keeps them all)."""
    known, found = imports(root, package)
    rank = {name: i for i, (name, _) in enumerate(layers)}
    problems = []
    for m in known:
        if layer_of(m, layers) is None:
            problems.append(f"{m} belongs to no layer: add it to LAYERS in tests/test_layers.py "
                            "(and to docs/ARCHITECTURE.md)")
    where = {m: p.relative_to(root).as_posix() for m, p in known.items()}
    for circle in circles(known, found):
        steps = []
        for a, b in zip(circle, circle[1:], strict=False):
            line = min(i.line for i in found if i.importer == a and i.imported == b)
            steps.append(f"{a} -> {b} ({where[a]}:{line})")
        problems.append("import circle: " + ", ".join(steps))
    used_exceptions = set()
    for i in found:
        src = layer_of(i.importer, layers)
        if src is None:
            continue
        if i.imported in known:
            dst = layer_of(i.imported, layers)
            if dst is None:
                continue
            at = f"{where[i.importer]}:{i.line}"
            if src in no_torch and dst == build_time:
                problems.append(f"{i.importer} ({src}, no torch) imports the build-time module {i.imported} ({at})")
            elif rank[dst] < rank[src]:
                if (i.importer, i.imported) in allowed and i.in_function:
                    used_exceptions.add((i.importer, i.imported))
                    continue
                problems.append(f"upward import: {i.importer} ({src}) imports {i.imported} ({dst}) at {at}")
        elif i.imported in TORCH_STACK:
            at = f"{where[i.importer]}:{i.line}"
            if src in no_torch:
                problems.append(f"{i.importer} ({src}) imports {i.imported}, which its layer never loads ({at})")
            elif src in torch_only_in_functions and not i.in_function:
                problems.append(f"{i.importer} ({src}) imports {i.imported} at module level ({at}): import it "
                                "inside the function that needs it, so commands without torch keep working")
    for pair in sorted(set(allowed) - used_exceptions):
        problems.append(f"ALLOWED_UPWARD names {pair[0]} -> {pair[1]}, which is no longer a function-level "
                        "import: remove the exception")
    return problems


def test_tstitch_trt_keeps_the_layer_rule():
    problems = violations(SOURCE, "tstitch_trt", LAYERS, NO_TORCH, TORCH_ONLY_IN_FUNCTIONS, BUILD_TIME,
                          ALLOWED_UPWARD)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_the_whole_package():
    known, found = imports(SOURCE, "tstitch_trt")
    # the command modules and the lazy imports are all seen (a parser that skipped functions would miss these)
    assert {"tstitch_trt.cli", "tstitch_trt.cli.run", "tstitch_trt.bundle.staging", "tstitch_trt.bench.sd"} \
        <= set(known)
    lazy = {(i.importer, i.imported) for i in found if i.in_function}
    assert ("tstitch_trt.cli.run", "tstitch_trt.pipeline.sd") in lazy
    assert ("tstitch_trt.pipeline.backends", "tstitch_trt.export.torch_backend") in lazy


# --- the checker on a synthetic package with planted violations ---------------------------------------
TOY_LAYERS = [("top", ["toy.top", "toy.top.*"]), ("build", ["toy.build", "toy.build.*"]),
              ("mid", ["toy.mid", "toy.mid.*"]), ("low", ["toy", "toy.low", "toy.low.*"])]


def _toy(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"toy/__init__.py": "", "toy/top/__init__.py": "", "toy/mid/__init__.py": "",
                      "toy/low/__init__.py": "", "toy/build/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def _check(root: Path, allowed: dict | None = None) -> list[str]:
    return violations(root, "toy", TOY_LAYERS, ("low",), ("mid",), "build", allowed or {})


CLEAN = {
    "toy/top/cmd.py": "from toy.mid import core\nfrom ..low.util import helper\n",
    "toy/mid/core.py": "import numpy\nfrom toy.low import util\n\n"
                       "def f():\n    import torch\n    from toy.build import x\n",
    "toy/low/util.py": "import json\n\ndef helper():\n    return 1\n",
    "toy/mid/api.py": "from toy.low.util import helper\n",
    "toy/build/x.py": "import torch\nfrom toy.mid.api import helper\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    # mid -> build inside a function is upward (build is above mid): clean only as an allowed exception
    root = _toy(tmp_path, CLEAN)
    assert _check(root, {("toy.mid.core", "toy.build.x"): "plug-in"}) == []
    assert any("upward import: toy.mid.core (mid) imports toy.build.x (build)" in p for p in _check(root))


@pytest.mark.parametrize("planted, expected", [
    # a circle through a function-level import, and relative imports resolved
    ({"toy/low/a.py": "from . import b\n", "toy/low/b.py": "def g():\n    from .a import thing\n"},
     "import circle: toy.low.a -> toy.low.b (toy/low/a.py:1), toy.low.b -> toy.low.a (toy/low/b.py:2)"),
    ({"toy/low/util.py": "def helper():\n    from toy.top import cmd\n"},
     "upward import: toy.low.util (low) imports toy.top.cmd (top) at toy/low/util.py:2"),
    ({"toy/low/util.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import toy.mid.core\n"},
     "upward import: toy.low.util (low) imports toy.mid.core (mid) at toy/low/util.py:3"),
    ({"toy/low/t.py": "def f():\n    import torch.nn\n"},
     "toy.low.t (low) imports torch, which its layer never loads (toy/low/t.py:2)"),
    ({"toy/mid/m.py": "from diffusers import UNet2DConditionModel\n"},
     "toy.mid.m (mid) imports diffusers at module level (toy/mid/m.py:1)"),
    ({"toy/low/v.py": "def f():\n    from toy.build.x import y\n"},
     "toy.low.v (low, no torch) imports the build-time module toy.build.x (toy/low/v.py:2)"),
    ({"toy/stray.py": ""}, "toy.stray belongs to no layer"),
])
def test_checker_fails_a_planted_violation(tmp_path, planted, expected):
    problems = _check(_toy(tmp_path, {**CLEAN, **planted}), {("toy.mid.core", "toy.build.x"): "plug-in"})
    assert any(expected in p for p in problems), problems


def test_an_exception_must_stay_lazy_and_in_use(tmp_path):
    # the allowed upward import moved to module level: reported, and the exception is reported as unused
    root = _toy(tmp_path, {**CLEAN, "toy/mid/core.py": "from toy.build import x\n"})
    problems = _check(root, {("toy.mid.core", "toy.build.x"): "plug-in"})
    assert any("upward import: toy.mid.core (mid) imports toy.build.x (build)" in p for p in problems)
    assert any("no longer a function-level import" in p for p in problems)


def test_the_circles_of_the_old_layout_would_fail(tmp_path):
    # the two circles issue 26 removed: cli.py <-> cli_sd.py (function level) and bundle/files <-> manifest
    root = _toy(tmp_path, {"toy/top/cli.py": "def cmd_run():\n    from toy.top.cli_sd import cmd_run_sd\n",
                           "toy/top/cli_sd.py": "def cmd_run_sd():\n    from toy.top.cli import load_init_noise\n",
                           "toy/low/files.py": "def check():\n    from toy.low.manifest import read\n",
                           "toy/low/manifest.py": "from toy.low.files import checked_file\n"})
    found = [p for p in _check(root) if p.startswith("import circle")]
    assert len(found) == 2, found
    assert any("toy.top.cli -> toy.top.cli_sd" in p for p in found), found
    assert any("toy.low.files -> toy.low.manifest" in p for p in found), found
