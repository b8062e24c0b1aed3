"""graft's import graph, read from the code by grimp (the engine of import-linter), function-local
imports included: no import cycle but the one the spine's second round is taking apart (issue
24), which may only shrink; and the layers that already hold. Imports under `if TYPE_CHECKING:` are
left out: only type checkers run them."""

import functools

import grimp

# The core circle: each of these reaches every other through imports (most of them function-local).
# Take a module out of it and out of this set together; add none.
CORE_CIRCLE = {
    "graft.build", "graft.config", "graft.config_checks", "graft.designs", "graft.rundir",
    "graft.data.contrastive", "graft.data.hf_dataset", "graft.data.interleaved", "graft.data.llava_json",
    "graft.data.sources", "graft.data.stream", "graft.data.webdataset",
    "graft.eval.captioning", "graft.eval.fewshot", "graft.eval.questions", "graft.eval.retrieval",
    "graft.eval.tasks", "graft.eval.text_world", "graft.eval.vqa", "graft.eval.vqav2", "graft.eval.world",
    "graft.models.blip2", "graft.models.fuyu",
}


@functools.cache
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("graft", include_external_packages=False, exclude_type_checking_imports=True,
                             cache_dir=None)  # nothing written into the checkout


def imports(module: str) -> set[str]:
    return set(graph().find_modules_directly_imported_by(module))


def cycles() -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in imports(v):
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

    for module in sorted(graph().modules):
        if module not in index:
            visit(module)
    return found


def test_cycles_are_found():
    """The search itself: a cycle that exists is reported (the circle's config ↔ config_checks)."""
    assert "graft.config_checks" in imports("graft.config") and "graft.config" in imports("graft.config_checks")
    assert any({"graft.config", "graft.config_checks"} <= c for c in cycles())


def test_no_import_cycle_but_the_core_circle_being_taken_apart():
    found = cycles()
    new = [sorted(c) for c in found if c != CORE_CIRCLE]
    assert not new, f"import cycles besides the known core circle (or the circle changed: shrink CORE_CIRCLE): {new}"
    assert found == [CORE_CIRCLE]


def test_models_import_only_errors_losses_and_other_models():
    """Models sit below data, training and evaluation (STYLE §15): the modules of graft.models read
    nothing of graft but errors, losses and each other (the two in the core circle excepted)."""
    for module in sorted(m for m in graph().modules if m.startswith("graft.models.") and m not in CORE_CIRCLE):
        allowed = ("graft.errors", "graft.losses")
        above = {m for m in imports(module) if not m.startswith("graft.models") and m not in allowed}
        assert not above, (module, above)


def test_only_the_entry_point_imports_the_cli():
    """The CLI is the top layer: the API, `graft compare` and the trainer do not call into it."""
    assert set(graph().find_modules_that_directly_import("graft.cli")) == {"graft.__main__"}
