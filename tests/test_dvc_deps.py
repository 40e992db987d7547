"""dvc.yaml's deps cannot drift from the code: every project file a stage imports is listed.

The walk is static and follows every ``import`` statement of a module, including those inside
functions (a stage's lazy imports run too). ``import a.b.c`` and ``from a.b import c`` run the
packages' ``__init__.py`` files, which are then walked as well; ``from pkg import name`` where
``name`` is not a submodule depends on everything ``pkg/__init__.py`` can hand out, i.e. every
module of the package (``varcore`` and ``varcore.fast`` export names lazily). A stage may list a
whole directory where that is the honest dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("varcore", "pipeline")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The repository file of a dotted module name (package ``__init__.py`` or ``.py``), if any."""
    base = root.joinpath(*name.split("."))
    for cand in (base / "__init__.py", base.with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imported(path: Path, root: Path) -> set[str]:
    """Dotted module names one file's import statements name (relative imports resolved);
    ``pkg.*`` stands for every module of ``pkg``."""
    tree = ast.parse(path.read_text(), str(path))
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            out.add(base)
            base_file = module_file(base, root)
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                if module_file(sub, root):
                    out.add(sub)
                elif base_file is not None and base_file.name == "__init__.py":   # a name a package hands out
                    out.add(f"{base}.*")
    return out


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def import_closure(module: str, root: Path = ROOT) -> set[Path]:
    """Every repository file that importing ``module`` (and calling its functions) may load."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name.endswith(".*"):
            pkg = module_file(name[:-2], root)
            if pkg is not None:
                todo += [_module_name(p, root) for p in pkg.parent.rglob("*.py")]
            continue
        if name.split(".")[0] not in PACKAGES:
            continue
        for part in _with_parents(name):
            f = module_file(part, root)
            if f is not None and f not in seen:
                seen.add(f)
                todo += sorted(_imported(f, root))
    return seen


def stage_modules(dvc: dict) -> dict[str, tuple[str, list[str]]]:
    """stage name -> (the ``python -m`` module of its cmd, its deps)."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        words = body["cmd"].split()
        module = words[words.index("-m") + 1]
        out[name] = (module, [str(d) for d in body.get("deps", [])])
    return out


def missing_deps(dvc: dict, root: Path = ROOT) -> dict[str, list[str]]:
    """Per stage, the project files its module imports that no dep (file or directory) covers."""
    result = {}
    for name, (module, deps) in stage_modules(dvc).items():
        covered = [root / d for d in deps]
        files = import_closure(module, root)
        missing = sorted(str(f.relative_to(root)) for f in files
                         if not any(f == c or c in f.parents for c in covered))
        if missing:
            result[name] = missing
    return result


DVC_FILES = ("dvc.yaml", "ablation/dvc.yaml", "gpu/dvc.yaml")   # ablation/ and gpu/ stages run from the root (wdir: ..)


@pytest.mark.parametrize("file", DVC_FILES)
def test_every_imported_project_file_is_a_dep(file):
    """When this fails, ``python -m tests.test_dvc_deps --write`` rewrites the code deps."""
    dvc = yaml.safe_load((ROOT / file).read_text())
    assert missing_deps(dvc) == {}, f"{file}: run `python -m tests.test_dvc_deps --write`"


def test_deps_check_fails_when_an_import_is_missing():
    """Drop one dep the data stage's code really imports: the check names it."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    deps = dvc["stages"]["data"]["deps"]
    deps.remove("pipeline/files.py")
    assert missing_deps(dvc) == {"data": ["pipeline/files.py"]}


def test_walk_follows_lazy_imports_and_package_exports(tmp_path):
    """Imports inside functions count, and ``from pkg import Name`` (not a module) counts the whole package."""
    (tmp_path / "pipeline" / "stages").mkdir(parents=True)
    (tmp_path / "varcore" / "fast").mkdir(parents=True)
    for d in ("pipeline", "pipeline/stages", "varcore", "varcore/fast"):
        (tmp_path / d / "__init__.py").write_text("")
    (tmp_path / "varcore" / "a.py").write_text("X = 1\n")
    (tmp_path / "varcore" / "fast" / "b.py").write_text("Y = 2\n")
    (tmp_path / "pipeline" / "helper.py").write_text("def f():\n    from varcore.fast import Y\n")
    (tmp_path / "pipeline" / "stages" / "s.py").write_text("from ..helper import f\nimport numpy\n")
    got = {str(p.relative_to(tmp_path)) for p in import_closure("pipeline.stages.s", tmp_path)}
    assert got == {"pipeline/__init__.py", "pipeline/stages/__init__.py", "pipeline/stages/s.py",
                   "pipeline/helper.py", "varcore/__init__.py", "varcore/fast/__init__.py", "varcore/fast/b.py"}


@pytest.mark.parametrize("name", ["data", "train_tokenizer", "encode_tokens"])
def test_early_stages_do_not_depend_on_the_transformer(name):
    """The lazy package exports keep the image and tokenizer stages off the transformer's code,
    so a change to varcore/var.py does not retrain the tokenizer."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    module, _ = stage_modules(dvc)[name]
    files = {str(f.relative_to(ROOT)) for f in import_closure(module)}
    assert "varcore/var.py" not in files


def write_code_deps(file: Path) -> None:
    """Rewrite, in ``file``, each stage's ``pipeline/`` and ``varcore/`` deps as its import closure
    (the other deps, comments and layout are kept)."""
    import re
    lines, out, i, module = file.read_text().splitlines(), [], 0, None
    while i < len(lines):
        line = lines[i]
        found = re.search(r"python -m (pipeline\.stages\.[a-z_]+)", line)
        module = found.group(1) if found else module
        deps = re.match(r"^(\s+)deps:\s*$", line)
        if not deps:
            out.append(line)
            i += 1
            continue
        out.append(line)
        indent, i, kept = deps.group(1) + "  ", i + 1, []
        while i < len(lines) and lines[i].startswith(indent + "- "):
            d = lines[i].strip()[2:]
            if not d.startswith(PACKAGES):
                kept.append(d)
            i += 1
        code = sorted(str(f.relative_to(ROOT)) for f in import_closure(module))
        out += [f"{indent}- {d}" for d in kept + code]
    file.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m tests.test_dvc_deps --write   (rewrites the code deps of "
                         f"{', '.join(DVC_FILES)})")
    for name in DVC_FILES:
        write_code_deps(ROOT / name)
