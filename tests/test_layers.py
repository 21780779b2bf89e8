# SPDX-License-Identifier: Apache-2.0
"""The package's layers talk one way: no import cycle, nn and the models reach the ops only
through ``functional``, the data layer stands alone, and serving never loads the trainer.

The import graph is read statically (``ast`` over every file of the package), so imports inside
functions count as much as module-level ones: a function-level import is a cycle that only
shows up at run time, on whichever path calls it first.
"""
from __future__ import annotations

import ast
import os
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PACKAGE = "adrec_fast"


def _scan(name: str, directory: Path, modules: dict) -> None:
    """Add every ``.py`` file under ``directory`` (package ``name``) to ``modules``:
    dotted name -> (path, is_package)."""
    for path in sorted(directory.rglob("*.py")):
        parts = [name, *path.relative_to(directory).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        modules[".".join(parts)] = (path, is_pkg)


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


class ImportGraph:
    """module -> the package modules it imports (anywhere in the file, functions included).

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module (a file, or a
    compiled extension such as ``_C``), else to ``pkg`` itself. A package's ``__init__`` running
    before its submodule is not an edge here: every package would be a cycle with its children.
    """

    def __init__(self, package: str = PACKAGE):
        self.package = package
        self.modules: dict[str, tuple[Path, bool]] = {}
        # the directory of __init__.py: an editable install lists more search locations
        _scan(package, Path(importlib.util.find_spec(package).origin).parent, self.modules)
        self.edges: dict[str, set[str]] = {}
        # _is_module may find subpackages shipped from elsewhere (kernels/): parse until none
        # is new
        while len(self.edges) < len(self.modules):
            for mod in [m for m in self.modules if m not in self.edges]:
                self.edges[mod] = self._imports(mod)

    def _imports(self, mod: str) -> set[str]:
        path, is_pkg = self.modules[mod]
        if path.suffix != ".py":
            return set()
        out = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in self._targets(mod, is_pkg, node):
                target = self._known(target)
                if target is not None and target != mod:
                    out.add(target)
        return out

    def _is_module(self, name: str) -> bool:
        if name in self.modules:
            return True
        parent = name.rpartition(".")[0]
        if parent not in self.modules or not self.modules[parent][1]:
            return False
        spec = _find_spec(name)
        if spec is None:
            return False
        if spec.submodule_search_locations:
            _scan(name, Path(spec.origin).parent, self.modules)
        self.modules.setdefault(name, (Path(spec.origin or name), False))
        return True

    def _targets(self, mod: str, is_pkg: bool, node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        if not isinstance(node, ast.ImportFrom):
            return []
        if node.level:
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            pkg = ".".join(base + ([node.module] if node.module else []))
        else:
            pkg = node.module or ""
        if not (pkg == self.package or pkg.startswith(self.package + ".")):
            return []
        return [f"{pkg}.{a.name}" if a.name != "*" and self._is_module(f"{pkg}.{a.name}")
                else pkg for a in node.names]

    def _known(self, name: str) -> str | None:
        """The longest prefix of ``name`` that is a module of the package, or None."""
        if not (name == self.package or name.startswith(self.package + ".")):
            return None
        while name and not self._is_module(name):
            name = name.rpartition(".")[0]
        return name or None

    def cycles(self) -> list[list[str]]:
        """One cycle (``[a, b, ..., a]``) per strongly connected component of two or more
        modules (Tarjan's algorithm, iterative)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        components = []
        for root in sorted(self.edges):
            if root in index:
                continue
            work = [(root, iter(sorted(self.edges[root])))]
            index[root] = low[root] = len(index)
            stack.append(root)
            on_stack.add(root)
            while work:
                v, children = work[-1]
                w = next(children, None)
                if w is not None:
                    if w not in index:
                        index[w] = low[w] = len(index)
                        stack.append(w)
                        on_stack.add(w)
                        work.append((w, iter(sorted(self.edges[w]))))
                    elif w in on_stack:
                        low[v] = min(low[v], index[w])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        components.append(comp)
        return [self._cycle_in(comp) for comp in components]

    def _cycle_in(self, comp: set[str]) -> list[str]:
        """A shortest cycle through the first module of ``comp`` (breadth-first)."""
        start = min(comp)
        prev = {start: None}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(self.edges[v] & comp):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start]  # path ends at start
                if w not in prev:
                    prev[w] = v
                    queue.append(w)
        raise AssertionError(f"no cycle through {start} in {sorted(comp)}")

    def reachable(self, sources, parents: bool = True) -> dict[str, str]:
        """module -> the module that first imports it, for everything importing ``sources``
        loads: the static edges, plus every parent package (its ``__init__`` runs first)
        with ``parents``."""
        seen: dict[str, str] = {}
        queue = [(s, "<start>") for s in sources]
        while queue:
            v, by = queue.pop(0)
            if v in seen:
                continue
            seen[v] = by
            up = [v.rsplit(".", i)[0] for i in range(1, v.count(".") + 1)] if parents else []
            for w in sorted(self.edges.get(v, ())) + up:
                if w not in seen:
                    queue.append((w, v))
        return seen

    def chain(self, seen: dict[str, str], target: str) -> str:
        path = [target]
        while seen[path[-1]] != "<start>":
            path.append(seen[path[-1]])
        return " -> ".join(reversed(path))


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph()


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_graph_sees_function_level_imports(graph):
    """The reader itself: an import inside a function body is an edge, and ``from pkg import
    module`` points at the module, not at the package."""
    assert "adrec_fast.functional" in graph.edges["adrec_fast.nn.interaction"]
    assert "adrec_fast._C" in graph.edges["adrec_fast.ops._backend"]  # inside a function
    assert "adrec_fast.training.loop" in graph.edges["adrec_fast.cli"]  # inside a function


def test_graph_finds_a_cycle_closed_inside_a_function(tmp_path, monkeypatch):
    pkg = tmp_path / "cyc_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..a import f\n    return f\n")
    (pkg / "d.py").write_text("import cyc_pkg.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = ImportGraph("cyc_pkg")
    assert g.edges["cyc_pkg.d"] == {"cyc_pkg.a"}
    assert g.cycles() == [["cyc_pkg.a", "cyc_pkg.sub.b", "cyc_pkg.sub.c", "cyc_pkg.a"]]
    (pkg / "sub" / "c.py").write_text("def f():\n    return 1\n")
    assert ImportGraph("cyc_pkg").cycles() == []


def test_no_import_cycle(graph):
    cycles = graph.cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_nn_and_models_reach_ops_only_through_functional(graph):
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.edges.items()
        if _under(m, "adrec_fast.nn", "adrec_fast.models")
        for t in targets
        if _under(t, "adrec_fast.ops", "adrec_fast._C", "adrec_fast.kernels")
    )
    assert not bad, "nn/models import the op layer directly:\n" + "\n".join(bad)


def test_nn_and_models_call_no_torch_ops(graph):
    bad = []
    for m, (path, _) in graph.modules.items():
        if not _under(m, "adrec_fast.nn", "adrec_fast.models") or path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr == "ops"
                    and isinstance(node.value, ast.Name) and node.value.id == "torch"):
                bad.append(f"{m}:{node.lineno}")
    assert not bad, f"torch.ops called from nn/ or models/ (use adrec_fast.functional): {bad}"


def test_data_layer_stands_alone(graph):
    """The data layer sits below every other one: serving, training and the models build on
    it, so it imports nothing of the package outside ``adrec_fast.data``."""
    seen = graph.reachable([m for m in graph.modules if _under(m, "adrec_fast.data")],
                           parents=False)
    bad = [graph.chain(seen, m) for m in seen if not _under(m, "adrec_fast.data")]
    assert not bad, "the data layer imports:\n" + "\n".join(bad)


def test_serving_reaches_no_training_module(graph):
    """Statically, functions included: nothing a serving module may import is the trainer."""
    seen = graph.reachable([m for m in graph.modules if _under(m, "adrec_fast.serving")])
    bad = [graph.chain(seen, m) for m in seen if _under(m, "adrec_fast.training")]
    assert not bad, "serving imports the trainer:\n" + "\n".join(bad)


def test_importing_serving_loads_no_training_module():
    """At run time, in a fresh interpreter: ``import adrec_fast.serving`` and a Scorer's
    load path leave no ``adrec_fast.training`` module in ``sys.modules``."""
    code = (
        "import sys\n"
        "import adrec_fast.serving\n"
        "from adrec_fast.serving import Scorer\n"
        "import adrec_fast.models.checkpoint\n"
        "print(sorted(m for m in sys.modules if m.startswith('adrec_fast.training')))\n"
        "print('adrec_fast.serving' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    loaded, serving = out.stdout.strip().splitlines()[-2:]
    assert serving == "True"
    assert loaded == "[]", f"import adrec_fast.serving loaded {loaded}"


def test_triton_ops_are_registered_only_where_they_can_run():
    """Without a CUDA device, TRITON_INTERPRET=1 or ADREC_TRITON_OPS=1, ``import adrec_fast``
    registers no *_triton op and imports neither triton nor torch's compiler stack (about 1.5 s
    of import time); with the interpreter switch it registers them."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device registers the Triton ops")
    code = (
        "import sys, torch\n"
        "import adrec_fast\n"
        "ops = [n for n in torch._C._dispatch_get_all_op_names()\n"
        "       if n.startswith('adrec::') and n.endswith('_triton')]\n"
        "print(len(ops), 'triton' in sys.modules, 'torch._inductor' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADREC_TRITON_OPS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "False", "False"]
    try:
        import triton  # noqa: F401
    except ImportError:
        return  # the extra is not installed: nothing registers either way
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**env, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    n, has_triton, _ = out.stdout.split()
    assert int(n) >= 6 and has_triton == "True"


# ---------------------------------------------------------------- the fused update in functional
def _bags(rows, B, seed):
    """A TBE-layout lookup over tables of ``rows`` rows: (table_offsets, indices, offsets),
    bags of 0-3 ids with repeats."""
    g = torch.Generator().manual_seed(seed)
    tofs = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()])
    lengths = torch.randint(0, 4, (len(rows) * B,), generator=g)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    table = torch.arange(len(rows)).repeat_interleave(B).repeat_interleave(lengths)
    indices = (torch.rand(int(offsets[-1]), generator=g) * torch.tensor(rows)[table]).long()
    return tofs, indices, offsets


@pytest.mark.parametrize("opt_name", ["sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("lr", [None, 0.3])
def test_functional_embedding_bag_fused_update_matches_reference(opt_name, pooling, lr):
    """``functional.embedding_bag(optimizer=...)``, the entry nn uses: the lookup of the
    reference, then one reference optimizer step on the touched rows (with ``lr`` when given)."""
    from adrec_fast import functional as F
    from adrec_fast import reference as R
    from adrec_fast.optim import FusedRowwiseAdagrad, FusedSGD

    rows, B, D = [11, 3, 7], 5, 6
    tofs, indices, offsets = _bags(rows, B, seed=len(opt_name) + (lr is None))
    w0 = torch.randn(sum(rows), D)
    opt = FusedSGD(lr=0.1) if opt_name == "sgd" else FusedRowwiseAdagrad(lr=0.1, eps=1e-6)
    state0 = torch.rand(sum(rows)) if opt_name == "rowwise_adagrad" else None
    g = torch.randn(B, len(rows) * D)

    w, state = w0.clone(), None if state0 is None else state0.clone()
    out = F.embedding_bag(w, tofs, indices, offsets, None, pooling, optimizer=opt,
                          state=state, lr=lr)
    code = 1 if pooling == "mean" else 0
    w_ref = w0.clone().requires_grad_(True)
    ref = R.embedding_bag(w_ref, tofs, indices, offsets, None, code)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(w, w0)  # the forward updates nothing
    out.backward(g)
    ref.backward(g)
    step_lr = opt.lr if lr is None else lr
    if opt_name == "sgd":
        torch.testing.assert_close(w, R.sgd_update(w0, w_ref.grad, step_lr))
    else:
        touched = torch.zeros(sum(rows), dtype=torch.bool)
        touched[F.embedding_rows(tofs, indices, offsets)] = True
        w_want, s_want = R.rowwise_adagrad_update(w0, state0, w_ref.grad, touched, step_lr,
                                                  opt.eps)
        torch.testing.assert_close(w, w_want)
        torch.testing.assert_close(state, s_want)


def test_functional_embedding_bag_names_bad_fused_arguments():
    from adrec_fast import functional as F
    from adrec_fast.optim import FusedRowwiseAdagrad

    tofs, indices, offsets = _bags([4, 4], 2, seed=0)
    w = torch.randn(8, 3)
    with pytest.raises(ValueError, match="state and lr belong to a fused optimizer"):
        F.embedding_bag(w, tofs, indices, offsets, state=torch.zeros(8))
    with pytest.raises(ValueError, match="state and lr belong to a fused optimizer"):
        F.embedding_bag(w, tofs, indices, offsets, lr=0.1)
    with pytest.raises(ValueError, match="FusedRowwiseAdagrad needs state"):
        F.embedding_bag(w, tofs, indices, offsets, optimizer=FusedRowwiseAdagrad(0.1))
    with pytest.raises(TypeError, match="optimizer must be adrec_fast.optim.FusedSGD"):
        F.embedding_bag(w, tofs, indices, offsets, optimizer=torch.optim.SGD([w], lr=0.1))
    with pytest.raises(ValueError, match="pooling must be 'sum' or 'mean'"):
        F.check_pooling("max")
    assert F.check_pooling("mean") == "mean"
    want = torch.cat([indices[:offsets[2]], indices[offsets[2]:] + 4])  # table 1 starts at 4
    assert torch.equal(F.embedding_rows(tofs, indices, offsets), want)


def test_models_reach_no_training_or_serving_module(graph):
    """Training and serving build on the models, never the reverse (functions included)."""
    seen = graph.reachable([m for m in graph.modules if _under(m, "adrec_fast.models")])
    bad = [graph.chain(seen, m) for m in seen
           if _under(m, "adrec_fast.training", "adrec_fast.serving", "adrec_fast.cli")]
    assert not bad, "the models import a layer above them:\n" + "\n".join(bad)
