"""Copy the modules of ``due_ext`` that a bundle's configs import into the bundle's ``scripts/`` folder.

An exported bundle must run where ``due_ext`` is not installed, so its configs import a vendored copy,
``scripts.due_ext``. The copy is made relocatable and harmless next to an installed ``due_ext``:

- absolute imports of ``due_ext`` become relative imports (the package works under any parent package);
- ``importlib.import_module("due_ext.…")`` names the vendored package instead;
- the ``torch.library`` namespace ``due_ext`` becomes ``due_ext_bundle``, so that importing both copies in one
  process (a test, a deploy app beside the package) never registers the same operator twice;
- the compiled extension is not copied: the vendored ``_backends`` finds no ``_C``, reports why, and the ops
  run their pure-PyTorch reference (see ``due_ext/ops/_dispatch.py``).

Only the import closure of the modules the configs name is copied (computed from the source's ``import``
statements, including the lazy ones inside functions).
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PACKAGE = "due_ext"
#: dotted name of the vendored copy inside an exported bundle (``<bundle>/scripts/due_ext``)
VENDORED_PACKAGE = "scripts.due_ext"
#: torch.library namespace of the vendored copy's operators
VENDORED_OP_NAMESPACE = "due_ext_bundle"
#: never vendored: the CLI and the exporter itself are not needed to run a bundle
EXCLUDED = ("due_ext.cli", "due_ext.__main__", "due_ext.export")

_FROM_IMPORT = re.compile(r"^(\s*)from\s+due_ext((?:\.\w+)*)\s+import\b")


def package_root() -> Path:
    """Folder of the installed ``due_ext`` sources."""
    return Path(__file__).resolve().parents[1]


def _module_file(module: str) -> Path | None:
    parts = module.split(".")[1:]
    base = package_root().joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _excluded(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in EXCLUDED)


def _imported_modules(path: Path, module: str) -> set[str]:
    """``due_ext`` modules imported anywhere in ``path`` (top level and inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != PACKAGE:
                continue
            found.add(name)
            # ``from due_ext.x import y`` may import the submodule ``due_ext.x.y``
            found.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                if node.args[0].value.split(".")[0] == PACKAGE:
                    found.add(node.args[0].value)
    return found


def import_closure(roots: Iterable[str]) -> list[str]:
    """Every ``due_ext`` module (with its parent packages) that ``roots`` import, transitively."""
    todo, seen = list(roots), set()
    while todo:
        module = todo.pop()
        if module in seen or _excluded(module):
            continue
        path = _module_file(module)
        if path is None:  # an attribute (``from due_ext.x import name``) or the compiled extension
            continue
        seen.add(module)
        parts = module.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(_imported_modules(path, module))
    return sorted(seen)


def _rewrite_source(text: str, module: str, is_package: bool) -> str:
    depth = len(module.split(".")) - (0 if is_package else 1)  # components of the containing package

    def relative(match: re.Match) -> str:
        return f"{match.group(1)}from {'.' * depth}{match.group(2).lstrip('.')} import"

    lines = [_FROM_IMPORT.sub(relative, line) for line in text.splitlines(keepends=True)]
    text = "".join(lines)
    if re.search(r"^\s*import\s+due_ext\b", text, flags=re.M):
        raise ValueError(f"{module}: `import due_ext...` cannot be vendored; use `from due_ext... import`")
    text = re.sub(r"import_module\((['\"])due_ext\.", rf"import_module(\1{VENDORED_PACKAGE}.", text)
    text = text.replace("due_ext::", f"{VENDORED_OP_NAMESPACE}::")
    return re.sub(r"torch\.ops\.due_ext\b", f"torch.ops.{VENDORED_OP_NAMESPACE}", text)


def vendor_package(roots: Iterable[str], scripts_dir: str | Path) -> list[str]:
    """Write the import closure of ``roots`` to ``scripts_dir/due_ext`` (rewritten as described in the module
    docstring) and ``scripts_dir/__init__.py``; returns the vendored module names."""
    scripts_dir = Path(scripts_dir)
    modules = import_closure(roots)
    (scripts_dir / PACKAGE).mkdir(parents=True, exist_ok=True)
    (scripts_dir / "__init__.py").write_text('"""Python code of this bundle: a vendored copy of due_ext."""\n')
    for module in modules:
        source = _module_file(module)
        assert source is not None
        is_package = source.name == "__init__.py"
        target = scripts_dir.joinpath(*(module.split(".") if is_package else module.split(".")[:-1]))
        target.mkdir(parents=True, exist_ok=True)
        text = _rewrite_source(source.read_text(), module, is_package=is_package)
        (target / source.name).write_text(text)
    return modules


def third_party_requirements(modules: Iterable[str]) -> dict[str, str]:
    """Installed distribution versions of the third-party packages the vendored ``modules`` import,
    ``{distribution: version}`` (torch, monai and numpy excluded: the metadata has fields of their own)."""
    to_dist = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    names: set[str] = set()
    for module in modules:
        path = _module_file(module)
        assert path is not None
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    versions = {}
    for name in sorted(names - stdlib - {PACKAGE, "torch", "monai", "numpy", "triton", "__future__"}):
        for dist in to_dist.get(name, []):
            versions[dist] = metadata.version(dist)
    return dict(sorted(versions.items(), key=lambda item: item[0].lower()))
