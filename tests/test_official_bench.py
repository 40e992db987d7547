"""benchmarks/official_step.py: it builds the official model with the paper's shape rule and the
step of train_step.py. Tested against a stand-in checkout written here (the official code is
not part of varscale)."""

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

# A stand-in for FoundationVision/VAR's models/var.py: it imports what the real one imports
# (``dist``, ``huggingface_hub``, ``models.vqvae``) and records the constructor's arguments.
FAKE_VAR = textwrap.dedent('''
    import torch
    import torch.nn as nn
    from huggingface_hub import PyTorchModelHubMixin
    import dist
    from models.vqvae import VQVAE, VectorQuantizer2

    class _Attn:
        using_flash, using_xform = False, False

    class _Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = _Attn()

    class VAR(nn.Module):
        last_kwargs = None

        def __init__(self, vae_local, **kw):
            super().__init__()
            VAR.last_kwargs = dict(kw, Cvae=vae_local.Cvae, V=vae_local.vocab_size, device=str(dist.get_device()))
            print("constructor output")
            self.emb = nn.Embedding(kw["num_classes"] + 1, 8)
            self.proj = nn.Linear(vae_local.Cvae, 8)
            self.head = nn.Linear(8, vae_local.vocab_size)
            self.blocks = nn.ModuleList([_Block()])
            self.L = sum(p * p for p in kw["patch_nums"])

        def init_weights(self, **kw):
            VAR.init_kwargs = kw

        def forward(self, label_B, x_BlCv):
            h = torch.cat([self.emb(label_B)[:, None], self.proj(x_BlCv)], dim=1)
            return self.head(h).float()
''')


@pytest.fixture
def official(tmp_path, monkeypatch):
    root = tmp_path / "VAR"
    (root / "models").mkdir(parents=True)
    (root / "models" / "var.py").write_text(FAKE_VAR)
    monkeypatch.syspath_prepend(str(BENCH))
    names = ("dist", "huggingface_hub", "models", "models.var", "models.vqvae")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    monkeypatch.setattr(sys, "path", list(sys.path))   # official_var_class prepends the checkout
    yield root, importlib.import_module("official_step")
    for n in names:   # no stand-in outlives the test
        sys.modules.pop(n, None)
    sys.modules.update(saved)


def test_builds_the_paper_shape_and_prints_one_json_line(official, capsys):
    root, bench = official
    bench.main(["--official-root", str(root), "--case", "3:2", "--warmup", "1", "--iters", "2", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, "the constructor's print must not reach stdout"
    rec = json.loads(lines[0])
    assert rec["bench"] == "official_train_step" and (rec["depth"], rec["batch"]) == (3, 2)
    assert rec["ms_median"] > 0 and rec["tokens_per_s"] == round(2 * 680 / (rec["ms_median"] / 1e3))
    assert rec["flash_attn_installed"] is False and rec["xformers_used"] is False
    VAR = sys.modules["models.var"].VAR
    kw = VAR.last_kwargs
    # w = 64 d, heads = d, drop-path 0.1 d / 24, as models.build_vae_var builds depth d
    assert (kw["depth"], kw["embed_dim"], kw["num_heads"]) == (3, 192, 3)
    assert kw["drop_path_rate"] == pytest.approx(0.1 * 3 / 24)
    assert kw["attn_l2_norm"] is True and kw["shared_aln"] is False and kw["cond_drop_rate"] == 0.1
    assert tuple(kw["patch_nums"]) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert (kw["Cvae"], kw["V"], kw["num_classes"], kw["device"]) == (32, 4096, 1000, "cpu")
    assert VAR.init_kwargs == dict(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)


def test_real_modules_win_over_stand_ins(official, monkeypatch):
    root, bench = official
    (root / "dist.py").write_text("def get_device():\n    return 'from-checkout'\n")
    VAR = bench.official_var_class(root, torch.device("cpu"))
    VAR(vae_local=type("V", (), {"Cvae": 32, "vocab_size": 16})(), num_classes=2, patch_nums=(1, 2))
    assert VAR.last_kwargs["device"] == "from-checkout"


def test_missing_checkout_names_the_path(official, tmp_path):
    _, bench = official
    with pytest.raises(SystemExit, match=str(tmp_path / "nowhere")):
        bench.official_var_class(tmp_path / "nowhere", torch.device("cpu"))
