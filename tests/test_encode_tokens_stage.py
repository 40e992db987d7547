"""Stage ``encode_tokens``: shards, manifest checks with clear errors, and the tokens -> f_hat round trip."""

import json

import numpy as np
import pytest
import torch

from pipeline.errors import ArtifactError
from pipeline.files import sha256_file
from pipeline.images import to_float_images
from pipeline.stages import data, encode_tokens
from pipeline.tokenizer.checkpoint import load_tokenizer, save_tokenizer
from pipeline.tokenizer.config import EncodeParams
from pipeline.tokens import TokenSpec, load_token_split, write_shard
from varcore import VQVAE, VQVAEConfig
from tests.helpers import write_image_folder

CFG = VQVAEConfig(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, mid_attn=False, Cvae=8,
                  vocab_size=64, patch_nums=(1, 2, 4, 8))


def _paths(tmp_path, out: str) -> encode_tokens.Paths:
    return encode_tokens.Paths(tmp_path / "tok.pt", tmp_path / "images", tmp_path / out, tmp_path / f"{out}.json")


@pytest.fixture
def tokenized(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=3, per_class=10)
    data.run(data.DataParams(source="image_folder", root=str(root), image_size=16, val_fraction=0.2),
             data.Paths(tmp_path / "images", tmp_path / "data.json"))
    torch.manual_seed(0)
    save_tokenizer(tmp_path / "tok.pt", VQVAE(CFG))
    metrics = encode_tokens.run(encode_tokens.Config(EncodeParams(batch_size=7, shard_size=10), CFG),
                                _paths(tmp_path, "tokens"))
    spec = TokenSpec(CFG.patch_nums, CFG.vocab_size, sha256_file(tmp_path / "tok.pt"))
    return tmp_path, spec, metrics


def test_shards_and_manifest(tokenized):
    tmp, spec, metrics = tokenized
    man = json.loads((tmp / "tokens" / "manifest.json").read_text())
    assert man["patch_nums"] == [1, 2, 4, 8] and man["vocab_size"] == 64 and man["L"] == 85
    assert man["num_classes"] == 3 and man["class_names"] == ["class0", "class1", "class2"]
    assert man["splits"]["train"]["count"] == 24 and len(man["splits"]["train"]["shards"]) == 3
    assert [s["count"] for s in man["splits"]["train"]["shards"]] == [10, 10, 4]
    tokens, labels = load_token_split(tmp / "tokens", "train", spec)
    assert tokens.shape == (24, 85) and labels.shape == (24,) and tokens.max() < 64
    assert metrics["images"] == 30 and 0 < metrics["encode_fraction"] <= 1
    assert not list((tmp / "tokens").rglob("*.tmp"))


def test_tokens_decode_to_the_tokenizers_own_f_hat(tokenized):
    tmp, spec, _ = tokenized
    vq = load_tokenizer(tmp / "tok.pt")
    tokens, _ = load_token_split(tmp / "tokens", "val", spec)
    images = np.load(tmp / "images" / "val.npy")
    with torch.no_grad():
        f_hat_ref, _, _ = vq.quantizer(vq.encode(to_float_images(images)))
    f_hat = vq.quantizer.idx_to_f_hat(vq.quantizer.split_tokens(tokens))
    assert torch.allclose(f_hat, f_hat_ref, atol=1e-5)


@pytest.mark.parametrize("spec_change, message", [
    (dict(patch_nums=(1, 2, 3, 8)), "patch_nums"),
    (dict(vocab_size=128), "vocab_size"),
    (dict(tokenizer_sha256="0" * 64), "tokenizer_sha256"),
])
def test_manifest_mismatch_is_a_clear_error(tokenized, spec_change, message):
    tmp, spec, _ = tokenized
    bad = TokenSpec(**{"patch_nums": spec.patch_nums, "vocab_size": spec.vocab_size,
                       "tokenizer_sha256": spec.tokenizer_sha256, **spec_change})
    with pytest.raises(ArtifactError, match=message) as e:
        load_token_split(tmp / "tokens", "train", bad)
    assert "manifest.json" in str(e.value)


def test_tampered_or_missing_shard_names_the_shard(tokenized):
    tmp, spec, _ = tokenized
    shard = tmp / "tokens" / "train" / "shard-00001.npz"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"shard-00001.npz: sha256 .* does not match"):
        load_token_split(tmp / "tokens", "train", spec)
    shard.unlink()
    with pytest.raises(ArtifactError, match=r"shard-00001.npz: shard listed in the manifest is missing"):
        load_token_split(tmp / "tokens", "train", spec)


def test_wrong_shape_shard_is_rejected(tokenized):
    tmp, spec, _ = tokenized
    man_path = tmp / "tokens" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["splits"]["val"]["shards"] = [write_shard(tmp / "tokens" / "val" / "shard-00000.npz",
                                                  np.zeros((6, 80), np.uint16), np.zeros(6))]
    man_path.write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match=r"shard-00000.npz: tokens shape \(6, 80\)"):
        load_token_split(tmp / "tokens", "val", spec)


def test_tokenizer_params_mismatch_stops_encoding(tokenized):
    tmp, _, _ = tokenized
    other = VQVAEConfig(**{**CFG.__dict__, "vocab_size": 128})
    with pytest.raises(ArtifactError, match="re-run the train_tokenizer stage"):
        encode_tokens.run(encode_tokens.Config(EncodeParams(), other), _paths(tmp, "tokens2"))


def test_missing_or_corrupt_tokenizer_names_the_file(tmp_path):
    with pytest.raises(ArtifactError, match="tok.pt: tokenizer checkpoint not found"):
        load_tokenizer(tmp_path / "tok.pt")
    (tmp_path / "tok.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="tok.pt: cannot read"):
        load_tokenizer(tmp_path / "tok.pt")


def test_tokenizer_checkpoint_bytes_depend_only_on_weights(tmp_path):
    torch.manual_seed(0)
    vq = VQVAE(CFG)
    save_tokenizer(tmp_path / "a.pt", vq)
    save_tokenizer(tmp_path / "b.pt", vq)
    assert sha256_file(tmp_path / "a.pt") == sha256_file(tmp_path / "b.pt")
