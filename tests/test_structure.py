"""Tests of the package's structure: function length, declared dependencies, the public API.

Read from the source (``ast``), so they take a second and import no chapter."""
import ast
import importlib
import re
import sys
import tomllib
from pathlib import Path

import pytest

import ntklab

PACKAGE = Path(ntklab.__file__).resolve().parent
ROOT = PACKAGE.parent
MAX_LINES = 100


def modules() -> dict[str, ast.Module]:
    """``{path relative to the repository: syntax tree}`` of every module of the package."""
    return {path.relative_to(ROOT).as_posix(): ast.parse(path.read_text(encoding="utf-8"))
            for path in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in path.parts}


def code_lines(node: ast.AST, source: list[str], docstrings: set[int]) -> int:
    """Lines of code of ``node``: not blank, not only a comment, not part of a docstring."""
    return sum(1 for i in range(node.lineno, node.end_lineno + 1)
               if i not in docstrings and source[i - 1].strip() and not source[i - 1].strip().startswith("#"))


def docstring_lines(tree: ast.Module) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def long_functions() -> dict[str, int]:
    """``{"path:qualified name": lines of code}`` of every function over :data:`MAX_LINES`."""
    found = {}
    for rel, tree in modules().items():
        source = (ROOT / rel).read_text(encoding="utf-8").splitlines()
        docs = docstring_lines(tree)

        def visit(node, prefix=""):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        n = code_lines(child, source, docs)
                        if n > MAX_LINES:
                            found[f"{rel}:{name}"] = n
                    visit(child, name + ".")
                else:
                    visit(child, prefix)

        visit(tree)
    return found


def test_code_lines_counts_neither_blank_lines_nor_comments_nor_docstrings():
    text = 'def f(x):\n    """Doc.\n\n    More doc."""\n    # a comment\n\n    y = x  # trailing\n    return y\n'
    tree = ast.parse(text)
    assert code_lines(tree.body[0], text.splitlines(), docstring_lines(tree)) == 3


def test_no_function_is_longer_than_100_lines_of_code():
    assert long_functions() == {}


# ------------------------------------------------------------------ dependencies
IMPORT_TO_DISTRIBUTION = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "myst_nb": "myst-nb"}


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {normalise(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}
    return names(project["dependencies"]), {k: names(v) for k, v in project["optional-dependencies"].items()}


def third_party_imports() -> dict[str, set[str]]:
    """``{top-level name: paths}`` of every import of a module outside the standard library and
    ``ntklab``, anywhere in the package (top level or inside functions)."""
    found: dict[str, set[str]] = {}
    for rel, tree in modules().items():
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "ntklab":
                    found.setdefault(top, set()).add(rel)
    return found


# Imported only by helpers of the book build, never by an experiment: an extra suffices.
OPTIONAL = {"myst_nb": "book", "yaml": "book"}


def test_every_import_is_a_declared_dependency():
    core, extras = declared()
    imports = third_party_imports()
    assert {"torch", "scipy", "pyautoattack", "ipywidgets"} <= set(imports)   # the test sees them
    for name, paths in sorted(imports.items()):
        dist = normalise(IMPORT_TO_DISTRIBUTION.get(name, name))
        if name in OPTIONAL:
            assert dist in extras[OPTIONAL[name]], f"{name} (imported by {sorted(paths)}) is not in [{OPTIONAL[name]}]"
        else:
            assert dist in core, f"{name} (imported by {sorted(paths)}) is not a dependency in pyproject.toml"


def test_every_declared_dependency_is_pinned_in_requirements():
    core, extras = declared()
    text = (ROOT / "requirements.txt").read_text().splitlines()
    pinned = {normalise(line.split("==")[0]) for line in text if "==" in line and not line.startswith("#")}
    missing = (core | set().union(*extras.values())) - pinned
    assert not missing, f"declared in pyproject.toml but not pinned in requirements.txt: {sorted(missing)}"


# ------------------------------------------------------------------ the public API
@pytest.mark.parametrize("module, private", [
    ("ntklab.data", {"atomic_save", "atomic_write_text", "describe_load_error", "cache_dir"}),
    ("ntklab.experiments", {"cached", "result_path", "checkpoint_dir", "using_root", "config_key"}),
])
def test_io_helpers_are_not_public(module, private):
    mod = importlib.import_module(module)
    assert not private & set(mod.__all__)
    assert all(hasattr(mod, name) for name in mod.__all__)


def test_every_public_module_loads_from_the_package():
    """``import ntklab`` then ``ntklab.<module>`` works for every public module (they load lazily)."""
    public = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    public |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert set(ntklab._SUBMODULES) == public, "add the module to ntklab._SUBMODULES in ntklab/__init__.py"


def test_contributing_names_follow_the_package():
    """CONTRIBUTING.md's fixed names are the ones the package's signatures use."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    names = re.search(r"## Fixed names\n\n(.*?)\n\n", text, re.S).group(1)
    assert "`model` (a model)" in names and "`x, y`" in names
    import inspect

    from ntklab import attacks, evaluate, ntk

    for fn in (attacks.fgsm, attacks.pgd, evaluate.clean_accuracy, ntk.empirical_ntk):
        assert next(iter(inspect.signature(fn).parameters)) == "model", fn.__name__
    assert list(inspect.signature(attacks.pgd).parameters)[1:3] == ["x", "y"]
