"""graft's import graph, read from the code by grimp (the engine of import-linter), function-local
imports and imports under `if TYPE_CHECKING:` included (a cycle a type checker follows is still a
cycle): no import cycle anywhere in graft/, and the layers below."""

import ast
import functools
import subprocess
import sys
from pathlib import Path

import grimp

import graft

# Bottom to top: a module imports only from its own layer and the layers below it (the cycle test
# keeps a layer's modules from importing each other in a circle). A module belongs to the layer of
# its longest matching prefix, so `graft.data.check` sits above `graft.data`.
LAYERS = (
    ("graft.errors", "graft.atomic", "graft.losses", "graft.objectives", "graft.distill_lm", "graft.config_values"),
    ("graft.models",),  # modules and their config dataclasses
    ("graft.config", "graft.distill"),  # parse, override, type-check: a leaf above the models' configs; distillation losses (masks from models)
    ("graft.data", "graft.trainer.checkpoint"),  # records → rows, tokenizers; checkpoint files
    ("graft.rundir", "graft.parts", "graft.teacher_store"),  # a run directory; a run's parts copied into a model; stored teacher outputs
    ("graft.designs",),  # the registry: what each design builds, processes, validates, can do
    ("graft.eval",),  # tasks ask the registry what a run can do
    ("graft.config_checks", "graft.build", "graft.recipes_contrastive"),  # cross-field validation; assembly; recipes a listing imports
    ("graft.trainer", "graft.report"),  # the trainer and its report
    ("graft.api", "graft.compare", "graft.export", "graft.plan", "graft.recipes",
     "graft.serve", "graft.serve_embed", "graft.serve_request",
     "graft.data.check", "graft.data.show", "graft.data.export", "graft.data.score", "graft.data.filter", "graft.data.recaption", "graft.scale", "graft.scaling",
     "graft.ladder", "graft.isoflop", "graft.sweep", "graft.sweep_report", "graft.sweep_predict", "graft.sweep_wsd"),  # what the commands call
    ("graft.cli", "graft.cli_data", "graft.__main__"),
)
# `graft` itself exposes the API lazily (graft/__init__.py): the package root is above everything.
ROOT = "graft"


@functools.cache
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("graft", include_external_packages=False, exclude_type_checking_imports=False,
                             cache_dir=None)  # nothing written into the checkout


def imports(module: str, g: grimp.ImportGraph | None = None) -> set[str]:
    return set((g or graph()).find_modules_directly_imported_by(module))


def cycles(g: grimp.ImportGraph) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in imports(v, g):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w), component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for module in sorted(g.modules):
        if module not in index:
            visit(module)
    return found


def layer(module: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def test_cycles_are_found():
    """The search itself, on a graph with a circle of three and a pair beside a tree."""
    g = grimp.ImportGraph()
    for a, b in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.d", "p.e"), ("p.e", "p.d"), ("p.f", "p.a")]:
        g.add_import(importer=a, imported=b)
    assert sorted(map(sorted, cycles(g))) == [["p.a", "p.b", "p.c"], ["p.d", "p.e"]]


def with_packages(g: grimp.ImportGraph) -> grimp.ImportGraph:
    """`g` plus what Python runs implicitly: importing graft.a.b first runs package graft.a's
    __init__, so a module importing graft.a.b also imports graft.a (its own ancestors left out, and
    the root, whose API is imported on first use: graft/__init__.py)."""
    out = grimp.ImportGraph()
    for module in g.modules:
        out.add_module(module)
        for imported in imports(module, g):
            out.add_import(importer=module, imported=imported)
            parts = imported.split(".")
            for package in (".".join(parts[:i]) for i in range(2, len(parts))):
                if package in g.modules and not (module + ".").startswith(package + "."):
                    out.add_import(importer=module, imported=package)
    return out


def test_no_import_cycle():
    """None between modules, nor through a package's __init__ (which runs before its modules)."""
    found = cycles(with_packages(graph()))
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_a_cycle_through_a_package_init_is_found():
    g = grimp.ImportGraph()  # r/p/__init__ imports r.p.a, which imports r.q.b, which imports r.p.c (running r.p)
    for a, b in [("r.p", "r.p.a"), ("r.p.a", "r.q.b"), ("r.q.b", "r.p.c")]:
        g.add_import(importer=a, imported=b)
    assert not cycles(g) and [sorted(c) for c in cycles(with_packages(g))] == [["r.p", "r.p.a", "r.q.b"]]


def test_layers():
    """Every import goes down or sideways (models below data below train below the CLI)."""
    upward = sorted((m, w) for m in graph().modules if m != ROOT for w in imports(m) if layer(w) > layer(m))
    assert not upward, f"imports from a higher layer (LAYERS): {upward}"


def test_the_layer_check_catches_an_upward_import():
    assert layer("graft.data.sources") < layer("graft.designs") < layer("graft.build") < layer("graft.trainer.loop")
    assert layer("graft.data.check") > layer("graft.trainer.loop") > layer("graft.trainer.checkpoint")


def test_models_import_only_errors_losses_and_other_models():
    """Models sit below data, training and evaluation (STYLE §15): the modules of graft.models read
    nothing of graft but errors, losses and each other."""
    for module in sorted(m for m in graph().modules if m.startswith("graft.models.")):
        allowed = ("graft.errors", "graft.losses")
        above = {m for m in imports(module) if not m.startswith("graft.models") and m not in allowed}
        assert not above, (module, above)


def test_config_is_a_leaf():
    """config.py parses, overrides and type-checks; it reads no design, data or evaluation module."""
    assert imports("graft.config") <= {"graft.atomic", "graft.errors", "graft.distill", "graft.config_values"} | {m for m in graph().modules
                                                                          if m.startswith("graft.models.")}


def test_only_the_entry_point_imports_the_cli():
    """The CLI is the top layer: the API, `graft compare` and the trainer do not call into it."""
    assert set(graph().find_modules_that_directly_import("graft.cli")) == {"graft.__main__"}


# Function-local imports: only what is slow to import and not always needed, each with a comment
# saying so. graft's own modules wait only in the CLI and the package roots, which keep `graft
# --help` quick (their comment says so once).
HEAVY = ("transformers", "datasets", "matplotlib", "peft", "torch.distributed.fsdp", "torch.utils.tensorboard",
         "graft.models.hf", "graft.models.hf_llava",  # each ≥ 0.1 s on top of torch (graft.models.hf* import transformers)
         "faiss")  # an optional extra (`.[curate]`): imported where a rule needs it, a one-line error without it
LAZY_FILES = ("cli.py", "cli_data.py", "__init__.py")


def local_imports(source: str) -> list[tuple[int, str, bool]]:
    """(line, module, commented) of each import inside a function: commented if its line, or the
    line above its run of import lines, holds a comment."""
    lines, found = source.splitlines(), []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and (node.lineno, node) not in found:
                    first = node.lineno - 1
                    while first > 0 and lines[first - 1].lstrip().startswith(("import ", "from ")):
                        first -= 1
                    said = any("#" in lines[i] for i in range(node.lineno - 1, node.end_lineno)) or (
                        first > 0 and "#" in lines[first - 1])
                    module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    found.append((node.lineno, module, said))
    return sorted(set(found))


def test_function_local_imports_are_heavy_and_commented():
    probe = "def f():\n    import yaml\n\n\ndef g():\n    # slow\n    from transformers import A\n    import torch"
    assert local_imports(probe) == [(2, "yaml", False), (7, "transformers", True), (8, "torch", True)]
    package = Path(graft.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        for line, module, said in local_imports(path.read_text()):
            heavy = any(module == h or module.startswith(h + ".") for h in HEAVY)
            lazy_ok = module.startswith("graft") and name in LAZY_FILES
            if not (heavy and said or lazy_ok):
                offenders.append(f"graft/{name}:{line}: {module}{'' if said or lazy_ok else ' (no comment)'}")
    assert not offenders, "move these imports to the top of their module, or say why they wait:\n" + "\n".join(
        offenders)


def test_training_imports_no_heavy_library():
    """What `graft train` imports for a built-in run leaves the HEAVY libraries alone (each costs
    every process a torchrun starts, and every test that starts one): transformers, datasets,
    matplotlib and peft load only when a run uses them."""
    code = ("import sys, graft.cli, graft.trainer.loop, graft.eval.harness; "
            "print(' '.join(m for m in ('transformers', 'datasets', 'matplotlib', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [], done.stdout
