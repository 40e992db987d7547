"""benchmarks/batch_switch.py: every variant runs its own process through each batch size and
reports it; variants compute the same function, so they draw the same tokens from one seed
(checked on the CPU with the tiny model, where the switched paths do not run); each switch turns
its path's gate off; a switch naming a path the library no longer has fails."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import batch_switch  # noqa: E402


def test_every_variant_reports_each_batch_with_the_same_tokens():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "batch_switch.py"), "--tiny", "--device", "cpu",
                          "--batches", "3,1", "--repeats", "1", "--jobs", "3", "--timeout", "120"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    exits = {r["variant"]: r["exit"] for r in lines if "exit" in r}
    assert exits == dict.fromkeys(batch_switch.VARIANTS, 0), out.stdout[-2000:]
    runs = [r for r in lines if "batch" in r]
    assert all(r["ok"] for r in runs)
    for batch in (3, 1):
        at = [r for r in runs if r["batch"] == batch]
        assert sorted(r["variant"] for r in at) == sorted(batch_switch.VARIANTS)
        assert {tuple(r["image_shape"]) for r in at} == {(batch, 3, 16, 16)}
        assert len({r["tokens_sum"] for r in at}) == 1   # the plain loop and the uncompiled engine agree


def test_a_switch_refuses_a_name_the_module_lacks():
    module = types.ModuleType("stand_in")
    module.present = 1
    batch_switch._replace(module, "present", 2)
    assert module.present == 2
    with pytest.raises(AttributeError, match="stand_in has no gone"):
        batch_switch._replace(module, "gone", 0)


def test_an_unknown_variant_is_named():
    with pytest.raises(SystemExit, match="unknown \\['nope'\\]"):
        batch_switch.main(["--variant", "nope", "--tiny", "--device", "cpu"])


def test_each_switch_turns_its_path_off(monkeypatch, tiny_var):
    import torch
    import varcore.fast.static_sampler as ss
    gates = [(batch_switch.sample_mod, "DECODE_GRAPH_MAX_IMAGES"), (batch_switch.kv_attention, "kernel_available"),
             (batch_switch.add_norm, "fused_available"), (batch_switch.fused_mlp, "fused_usable"),
             (ss, "StaticScales"), (batch_switch.graphs, "fresh_cublas_workspaces")]
    for module, name in gates:   # restored after the test
        monkeypatch.setattr(module, name, getattr(module, name))
    for name, variant in batch_switch.VARIANTS.items():
        if variant.switch is not None:
            variant.switch()
    assert batch_switch.sample_mod.DECODE_GRAPH_MAX_IMAGES == 0
    assert batch_switch.kv_attention.kernel_available(None, None, None) is False
    assert batch_switch.add_norm.fused_available(None, None) is False
    assert batch_switch.fused_mlp.fused_usable(None) is False
    assert batch_switch.graphs.fresh_cublas_workspaces() is None
    # the engine without graphs: asked for graphs (which would fail on the CPU), built without, and kept
    # by static_engine under the key it asked for
    eng = ss.StaticScales(tiny_var, 2, torch.device("cpu"), None, graphs=True)
    assert eng.graphs is None and eng.key[3] is True
    assert batch_switch.VARIANTS["keep_workspace_none"].env == {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}
    assert batch_switch.VARIANTS["exact_engine"].engine == "static_exact"
    assert batch_switch.VARIANTS["eager_decode"].compiled_decode is False
