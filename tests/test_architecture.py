"""The package's layout holds: imports go down the layers, no cycles, only storage/ touches files.

Pure AST over ``src/ckpts`` (nothing is imported, torch least of all), so it runs in a
second. docs/architecture.md draws the same layers; change both together.

What counts as an import: every ``import``/``from ... import`` statement, at module
level, inside functions and classes, and under ``if TYPE_CHECKING:``; relative imports
are resolved; ``from ckpts import Name`` counts as an import of the module that defines
``Name`` (read from the root ``__init__``'s own imports and its ``_MOVED`` table);
``importlib.import_module("ckpts....")`` with a literal name counts too.

- The layer check counts all of them, ``TYPE_CHECKING`` ones included: a type named
  from a higher layer is a dependency on it all the same.
- The cycle check counts module-level and function-level imports (an import moved into
  a function to dodge a cycle still ties the two modules together), and leaves out
  ``TYPE_CHECKING``-only ones: they never run, and are how two modules of one folder
  name each other's types; across folders the layer check already catches them. It also
  follows the parent packages Python imports first (``import ckpts.storage._port`` runs
  ``ckpts/storage/__init__.py``), except a module's own ancestors.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "ckpts"

# Modules every layer may import: they import nothing of ckpts themselves.
BASE = {"errors", "_version"}

# The layers, bottom to top: each folder and the folders it may import besides its own
# and BASE. ``ckpts`` is the root ``__init__`` (the public API): it may import anything,
# and only the top folders may import it (its names live in _run and below).
CORE = {"storage", "_format", "_tensors", "_state", "_checkpoint", "_run"}
LAYERS: dict[str, set[str]] = {
    "storage": set(),
    "_format": {"storage"},
    "_tensors": {"_format", "storage"},
    "_state": {"_format"},
    "_checkpoint": {"_tensors", "_state", "_format", "storage"},
    "_run": {"_checkpoint", "_tensors", "_state", "_format", "storage"},
    "testing": CORE | {"ckpts"},
    "export": CORE | {"ckpts"},  # not cli: the CLI calls export, never the reverse
    "integrations": CORE | {"ckpts"},
    "cli": CORE | {"ckpts", "testing", "export", "integrations"},
    "ckpts": CORE | {"testing", "export", "integrations", "cli"},
}

MAX_PUBLIC_NAMES = 30
MAX_LINES = 600

# Outside storage/, these calls open, list, create, rename or delete files. A run's
# files are reached through the storage port only (ckpts.storage.Storage).
FILE_FUNCTIONS = {
    *(f"os.{name}" for name in (
        "rename", "renames", "replace", "remove", "removedirs", "unlink", "link", "symlink",
        "rmdir", "mkdir", "makedirs", "open", "fdopen", "scandir", "listdir", "walk",
        "truncate")),
    "open", "io.open", "glob.glob", "glob.iglob",
    # readers and writers that take a path: a checkpoint's files are read through the port
    "torch.load", "torch.save", "numpy.load", "numpy.save", "numpy.memmap", "numpy.fromfile",
    "safetensors.safe_open", "safetensors.torch.load_file", "safetensors.torch.save_file",
    "safetensors.torch.load_model", "safetensors.torch.save_model",
}
FILE_MODULES = {"shutil", "mmap", "tempfile"}  # any call of theirs
# Path methods; flagged on any object, since the AST has no types.
PATH_METHODS = {
    "unlink", "rename", "mkdir", "write_text", "write_bytes", "read_text", "read_bytes",
    "open", "touch", "rmdir", "hardlink_to", "symlink_to", "iterdir", "glob", "rglob",
}
# ``Path.replace(target)`` takes one argument; ``str.replace`` two, ``datetime.replace``
# and ``dataclasses.replace`` keywords: only the one-argument form is flagged.

# Modules (or module:function) that touch files which are not a run's, and why. Keep it
# short: whatever reads or writes a run's files goes through the storage port instead.
FILES_ALLOWED = {
    # the folder or file the user asked an export to write, and the config.json and
    # tokenizer files the user passed to it
    "ckpts.export": "writes the export the user asked for",
    "ckpts.export.gguf": "writes the GGUF file the user asked for",
    "ckpts.export.hf": "writes the Hugging Face folder the user asked for",
    "ckpts.export.shards": "writes the safetensors files the user asked for",
    # other tools' checkpoints (Trainer folders, .ckpt, torch.save files) the user imports;
    # the ckpts run it writes goes through CheckpointManager
    "ckpts._run.importing": "reads the foreign checkpoints being imported",
    # the demo's scratch folder, marked as the demo's, and the page the user asked for
    "ckpts.cli.demo:prepare_directory": "makes the demo's own scratch folder",
    "ckpts.cli.report:write_report": "writes the HTML file the user asked for",
    # check_resume's work folder and the logs of the training commands it runs
    "ckpts.testing._resume_check:_prepare": "makes its work folder",
    "ckpts.testing._resume_check:_Runner._start": "logs of its subprocesses",
    "ckpts.testing._resume_check:_Runner.log_tail": "logs of its subprocesses",
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "ckpts._run.manager"
    target: str  # the imported module, e.g. "ckpts._format.catalog"
    line: int
    kind: str  # "module", "function" or "type_checking"

    def where(self) -> str:
        return f"{path_of(self.source)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@functools.cache
def tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def path_of(name: str) -> str:
    return str(modules()[name].relative_to(SRC.parent))


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def folder(name: str) -> str:
    """The layer of a module: "ckpts" for the root, "errors", "_run", "cli", ..."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "ckpts"


@functools.cache
def root_table(table: str) -> dict[str, str]:
    """A name -> module table of the root ``__init__``: "imports", "_LAZY" or "_MOVED"."""
    names: dict[str, str] = {}
    for node in ast.walk(tree("ckpts")):
        if (table == "imports" and isinstance(node, ast.ImportFrom) and node.level == 0
                and node.module and node.module.startswith("ckpts.")):
            names.update((alias.asname or alias.name, node.module) for alias in node.names)
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == table for t in node.targets)):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    names[key.value] = value.value
    return names


def root_names() -> dict[str, str]:
    """What ``from ckpts import Name`` imports: Name -> the module that defines it."""
    return {**root_table("imports"), **root_table("_LAZY"), **root_table("_MOVED")}


def resolve(source: str, module: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``source``."""
    if level == 0:
        return module or ""
    package = source if is_package(source) else source.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def walk(node: ast.AST, kind: str = "module") -> Iterator[tuple[ast.AST, str]]:
    """Every node under ``node`` with the kind of import it would be."""
    for child in ast.iter_child_nodes(node):
        child_kind = kind
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) \
                and kind == "module":
            child_kind = "function"
        if isinstance(child, ast.If) and is_type_checking(child.test):
            yield child, kind
            for stmt in child.body:
                yield stmt, "type_checking"
                yield from walk(stmt, "type_checking")
            for stmt in child.orelse:
                yield stmt, kind
                yield from walk(stmt, kind)
            continue
        yield child, child_kind
        yield from walk(child, child_kind)


def targets(source: str, node: ast.AST) -> Iterator[str]:
    """The ckpts modules one statement or call imports (may include missing ones)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        base = resolve(source, node.module, node.level)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if submodule in modules():
                yield submodule
            elif base == "ckpts" and alias.name in root_names():
                yield root_names()[alias.name]
            else:
                yield base
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
               or (isinstance(node.func, ast.Name) and node.func.id == "import_module"))):
        yield node.args[0].value


@functools.cache
def imports() -> tuple[Import, ...]:
    found = []
    for source in modules():
        for node, kind in walk(tree(source)):
            for target in targets(source, node):
                if target == "ckpts" or target.startswith("ckpts."):
                    found.append(Import(source, target, getattr(node, "lineno", 0), kind))
    return tuple(found)


def test_every_ckpts_import_names_a_module_that_exists() -> None:
    missing = [f"{i.where()} imports {i.target}, which is not a module of src/ckpts"
               for i in imports() if i.target not in modules()]
    assert not missing, ("Imports of modules that moved or never existed (function-level "
                         "ones fail only when called):\n" + "\n".join(missing))


def test_imports_go_down_the_layers_only() -> None:
    unknown = sorted({folder(m) for m in modules()} - set(LAYERS) - BASE)
    assert not unknown, (f"New folder(s) {unknown} under src/ckpts: add each to LAYERS in "
                         "tests/test_architecture.py and to docs/architecture.md, with the "
                         "folders it may import")
    wrong = []
    for i in imports():
        if i.target not in modules():
            continue  # reported by the test above
        here, there = folder(i.source), folder(i.target)
        if there in BASE or here == there or there in LAYERS[here]:
            continue
        may = ", ".join([*sorted(LAYERS.get(here, ())), *sorted(BASE)])
        kind = {"module": "", "function": " (in a function)",
                "type_checking": " (under TYPE_CHECKING)"}[i.kind]
        fix = (f"import the module that defines the name instead of the {there} package"
               if there == "ckpts" else
               f"move what it needs down into {here}/ or a layer below, or pass it in from "
               f"{there}/")
        wrong.append(f"{i.where()} imports {i.target}{kind}, but {here}/ may import only "
                     f"its own modules and {may}: {fix}.")
    assert not wrong, ("Imports that go up the layers (the table is LAYERS in "
                       "tests/test_architecture.py, drawn in docs/architecture.md):\n"
                       + "\n".join(wrong))


def test_base_modules_import_nothing_of_ckpts() -> None:
    wrong = [f"{i.where()} imports {i.target}" for i in imports()
             if folder(i.source) in BASE and folder(i.target) not in BASE]
    assert not wrong, "errors and _version sit below every layer:\n" + "\n".join(wrong)


def test_the_public_api_is_made_of_core_names() -> None:
    # What lets testing/, export/ and integrations/ import ``ckpts`` itself. (The
    # deprecated aliases of _MOVED point at ckpts.storage and ckpts.testing.)
    public = {**root_table("imports"), **root_table("_LAZY")}
    above = {name: module for name, module in public.items()
             if folder(module) not in CORE | BASE}
    assert not above, (f"ckpts/__init__.py exports names from above _run: {above}. "
                       "Give them a public namespace of their own (like ckpts.testing)")


def import_graph() -> dict[str, dict[str, Import]]:
    """Module -> the modules it imports when it or its functions run."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for i in imports():
        if i.kind == "type_checking" or i.target not in modules():
            continue
        graph[i.source].setdefault(i.target, i)
        parent = i.target.rpartition(".")[0]
        while parent and not (i.source == parent or i.source.startswith(parent + ".")):
            graph[i.source].setdefault(parent, i)  # Python runs the parent package first
            parent = parent.rpartition(".")[0]
    return graph


def strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, by any path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, {}):
                groups.append(sorted(group))

    for node in sorted(modules()):
        if node not in index:
            visit(node)
    return groups


def shortest_cycle(graph: dict[str, dict[str, Import]], start: str, group: set[str]) -> str:
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, {})):
            if nxt == start:
                hops = [*paths[node], start]
                return " -> ".join(
                    f"{a} ({graph[a][b].where()}"
                    f"{', in a function' if graph[a][b].kind == 'function' else ''})"
                    for a, b in itertools.pairwise(hops)) + f" -> {start}"
            if nxt in group and nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    return start


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    cycles = [f"{', '.join(group)}; e.g. {shortest_cycle(graph, group[0], set(group))}"
              for group in strongly_connected(graph)]
    assert not cycles, ("Circular imports (function-level imports count). Break each by "
                        "moving what both need into a module below them both, or by passing "
                        "it in:\n" + "\n".join(cycles))


def module_aliases(module: ast.Module) -> dict[str, str]:
    """Local name -> what it stands for: ``{"os": "os", "rm": "os.remove"}``."""
    aliases = {}
    for node in ast.walk(module):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    aliases[alias.name.partition(".")[0]] = alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id if node.id == "open" else None)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else None
    return None


def touches_files(call: ast.Call, aliases: dict[str, str]) -> str | None:
    """What a call does to files, if it looks like it touches one."""
    name = dotted(call.func, aliases)
    if name in FILE_FUNCTIONS or (name and name.partition(".")[0] in FILE_MODULES):
        return name
    if not isinstance(call.func, ast.Attribute) or name:
        return None  # a module's function: not a Path method
    method = call.func.attr
    if method in PATH_METHODS or (method == "replace" and len(call.args) == 1
                                  and not call.keywords):
        return f"<object>.{method}"
    return None


def file_calls(name: str) -> Iterator[tuple[str, int, str]]:
    """(function qualname or "", line, call) for each file-touching call in a module."""
    module = tree(name)
    aliases = module_aliases(module)

    def visit(node: ast.AST, scope: str) -> Iterator[tuple[str, int, str]]:
        for child in ast.iter_child_nodes(node):
            inner = scope
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                inner = f"{scope}.{child.name}" if scope else child.name
            if isinstance(child, ast.Call) and (what := touches_files(child, aliases)):
                yield scope, child.lineno, what
            yield from visit(child, inner)

    yield from visit(module, "")


def allowed(name: str, scope: str) -> bool:
    return name in FILES_ALLOWED or any(
        f"{name}:{scope}" == key or f"{name}:{scope}".startswith(key + ".")
        for key in FILES_ALLOWED)


def test_only_the_storage_port_touches_files() -> None:
    wrong = [f"{path_of(name)}:{line} {what}() in {scope or 'the module'}"
             for name in modules() if folder(name) != "storage"
             for scope, line, what in file_calls(name) if not allowed(name, scope)]
    assert not wrong, (
        "Calls outside ckpts/storage/ that open, list, create, rename or delete files. A "
        "run's bytes go through the storage port: use the Storage's list/read/stage/commit/"
        "delete/update, or add the operation to the port (storage/_port.py) and its "
        "backends. If the file is not a run's (an export, a user's output file), add the "
        "module or module:function to FILES_ALLOWED in tests/test_architecture.py with "
        "the reason:\n" + "\n".join(wrong))


def test_the_files_allow_list_names_real_places() -> None:
    # a stale entry would silently allow whatever next takes its name
    stale = []
    for key in FILES_ALLOWED:
        name, _, scope = key.partition(":")
        if name not in modules() or (scope and not any(
                s == scope or s.startswith(scope + ".") for s, _, _ in file_calls(name))):
            stale.append(key)
    assert not stale, f"FILES_ALLOWED entries that touch no files (remove them): {stale}"


def test_the_public_api_has_at_most_30_names() -> None:
    names = next(node.value.elts for node in tree("ckpts").body
                 if isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                 and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets))
    assert len(names) <= MAX_PUBLIC_NAMES, (
        f"ckpts.__all__ has {len(names)} names, at most {MAX_PUBLIC_NAMES}: give the new "
        "name a namespace of its own (like ckpts.storage, ckpts.testing) or drop one")


def test_every_module_opens_with_a_docstring_line_of_its_own() -> None:
    firsts: dict[str, list[str]] = defaultdict(list)
    missing = []
    for name in modules():
        doc = ast.get_docstring(tree(name))
        if not doc:
            missing.append(path_of(name))
        else:
            firsts[doc.splitlines()[0].strip()].append(path_of(name))
    assert not missing, f"Modules without a docstring that says what they own: {missing}"
    same = [f"{line!r}: {', '.join(paths)}" for line, paths in firsts.items() if len(paths) > 1]
    assert not same, ("Modules that open with the same docstring line; make each say what "
                      "that module alone owns:\n" + "\n".join(same))


def test_every_module_is_at_most_600_lines() -> None:
    long = [f"{path_of(name)}: {n} lines" for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    assert not long, (f"Modules over {MAX_LINES} lines: split each by concept into modules "
                      "of the same folder (one concept per module, docs/architecture.md):\n"
                      + "\n".join(long))
