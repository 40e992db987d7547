"""The code's shape stays as the restructure left it: the model file reads like the paper, speed
lives in varcore.fast, every stage has one shape, and no function grows past a screen."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
    return out


def test_no_pipeline_function_is_longer_than_50_lines():
    long = [f"{p.relative_to(ROOT)}:{f.name} ({f.end_lineno - f.lineno + 1})"
            for p in (ROOT / "pipeline").rglob("*.py") for f in _functions(p) if f.end_lineno - f.lineno >= 50]
    assert long == []


def test_the_model_file_is_math_only():
    """varcore/var.py meets no Triton, ctypes, flex block masks, compile regions or speed paths."""
    imports = _imports(ROOT / "varcore" / "var.py")
    assert not {i for i in imports if "fast" in i or i in ("triton", "ctypes")}
    tree = ast.parse((ROOT / "varcore" / "var.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & {"compile", "flex_attention", "BlockMask", "checkpoint", "cuda", "is_cuda", "CUDAGraph"}
    for model_file in ("scales", "quant", "vqvae", "disc", "var", "flops", "errors"):
        assert not any("fast" in i and "bicubic" not in i for i in _imports(ROOT / "varcore" / f"{model_file}.py"))


def test_adaln_block_forward_is_its_math():
    tree = ast.parse((ROOT / "varcore" / "var.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AdaLNBlock")
    forward = next(n for n in block.body if isinstance(n, ast.FunctionDef) and n.name == "forward")
    assert forward.end_lineno - forward.lineno + 1 <= 10
    first = ast.unparse(forward.body[0])
    assert first.startswith("gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(")


def test_every_stage_has_one_shape_and_imports_no_other_stage():
    stages = sorted(p.stem for p in (ROOT / "pipeline" / "stages").glob("*.py") if p.stem != "__init__")
    assert {"data", "train_tokenizer", "encode_tokens", "train_var"} <= set(stages)
    for name in stages:
        path = ROOT / "pipeline" / "stages" / f"{name}.py"
        names = {n.name for n in ast.parse(path.read_text()).body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
            t.id for n in ast.parse(path.read_text()).body if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Name)}
        assert {"Paths", "load_config", "run", "main"} <= names, name
        others = {f".{s}" for s in stages if s != name} | {f"pipeline.stages.{s}" for s in stages if s != name}
        assert not (_imports(path) & others), name


@pytest.mark.parametrize("package", ["varcore", "pipeline"])
def test_no_module_is_named_like_a_standard_library_module(package):
    clash = [str(p.relative_to(ROOT)) for p in (ROOT / package).rglob("*.py")
             if p.stem in sys.stdlib_module_names]
    assert clash == []
