"""The on-disk model store: ``<store>/<model>/<version>/`` = manifest + safetensors + tokenizer.

Only safetensors are ever read. Every file the manifest lists carries a sha256; a missing, corrupt or
pickle file is refused with an error naming it, before torch or transformers see it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from model_store.early_exit import EarlyExitClassifier, adapter_for_config_check
from model_store.errors import (
    CorruptFileError,
    MissingFileError,
    ModelNotFoundError,
    PickleRefusedError,
    UnsupportedDeviceError,
)
from model_store.layout import StoreLayout, read_manifest
from model_store.manifest import CONFIG_FILE, MANIFEST_FILE, WEIGHTS_FILE, Manifest

logger = logging.getLogger(__name__)

# Weight formats that unpickle (and so can run code) on load. Their presence alone refuses a version.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


@dataclass
class LoadedModel:
    """A model version ready to run: manifest, weights on a device, tokenizer."""

    manifest: Manifest
    model: EarlyExitClassifier
    tokenizer: PreTrainedTokenizerBase
    path: Path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore(StoreLayout):
    """A directory of models, each a directory of versions: saving and loading them."""

    def save(
        self,
        model: EarlyExitClassifier,
        tokenizer: PreTrainedTokenizerBase,
        manifest: Manifest,
    ) -> Path:
        """Write a new version; ``manifest.version`` must not exist yet. Returns its directory."""
        path = self.root / manifest.name / manifest.version
        if path.exists():
            raise FileExistsError(f"{path} already exists; versions are immutable")
        tmp = path.with_name(f".{manifest.version}.partial")
        tmp.mkdir(parents=True, exist_ok=False)
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.encoder.config.to_json_file(str(tmp / CONFIG_FILE))
        tokenizer.save_pretrained(str(tmp))
        files = {
            p.name: sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
        }
        final = manifest.model_copy(update={"files": files})
        (tmp / MANIFEST_FILE).write_text(final.model_dump_json(indent=2) + "\n")
        tmp.rename(path)  # a version appears whole or not at all
        return path

    def load(
        self,
        name: str,
        version: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LoadedModel:
        return load_version_dir(self.version_dir(name, version), device=device, dtype=dtype)


def check_files(path: Path, manifest: Manifest) -> None:
    """Refuse pickles; every listed file must exist and match its checksum."""
    for p in sorted(path.iterdir()):
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise PickleRefusedError(p, "pickle-based weight files are refused; only safetensors are loaded")
    for required in (WEIGHTS_FILE, CONFIG_FILE):
        if required not in manifest.files:
            raise CorruptFileError(path / MANIFEST_FILE, f"manifest does not list {required}")
    for file_name, expected in manifest.files.items():
        file_path = path / file_name
        if "/" in file_name or file_name.startswith("."):
            raise CorruptFileError(path / MANIFEST_FILE, f"file name {file_name!r} is not a plain name")
        if not file_path.is_file():
            raise MissingFileError(file_path, "listed in the manifest but missing")
        if sha256_of(file_path) != expected:
            raise CorruptFileError(file_path, "sha256 does not match the manifest (corrupt or modified)")


def load_version_dir(
    path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load one version directory, checking everything before building the model."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is not a model version directory")
    manifest = read_manifest(path)
    check_files(path, manifest)

    config_path = path / CONFIG_FILE
    try:
        config_dict = json.loads(config_path.read_text())
        model_type = config_dict.pop("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, AttributeError) as e:
        raise CorruptFileError(config_path, f"not a valid encoder config ({type(e).__name__})") from None
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
    except ValueError as e:
        raise CorruptFileError(config_path, f"cannot build config: {e}") from None
    adapter_for_config_check(config)

    weights_path = path / WEIGHTS_FILE
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise CorruptFileError(weights_path, f"not a readable safetensors file: {e}") from None
    model = EarlyExitClassifier.from_config(
        config,
        len(manifest.labels),
        manifest.ramp.hidden_size,
        checkpoint_head=manifest.ramp.final == "checkpoint_head",
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CorruptFileError(
            weights_path,
            f"weights do not fit the manifest's model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})",
        )
    model.pair_separator_id = manifest.pair_separator_id if manifest.input_kind == "pair" else None
    int8 = manifest.quantization == "int8_dynamic"
    if int8 and (torch.device(device).type != "cpu" or dtype != torch.float32):
        raise UnsupportedDeviceError(
            f"{path} is an int8 version (quantization int8_dynamic): it runs on cpu in float32; "
            "serve its float32 source version on a GPU"
        )
    model.to(device=device, dtype=dtype).eval()
    if int8:
        from model_store.quantize import int8_engine, quantize_encoder

        engine = manifest.int8_engine
        if engine is None or engine not in torch.backends.quantized.supported_engines:
            here = int8_engine()
            if engine is not None:
                logger.warning(
                    "%s was calibrated on the %s int8 kernels, which this torch lacks; using %s (answers "
                    "may differ a little from its calibration)", path, engine, here,
                )  # fmt: skip
            engine = here
        quantize_encoder(model, engine, manifest.int8_weights)

    return LoadedModel(manifest=manifest, model=model, tokenizer=load_tokenizer(path), path=path)


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(str(path))  # type: ignore[no-any-return]
    except Exception as e:  # tokenizers raise many types; all mean the same thing here
        raise CorruptFileError(path / "tokenizer.json", f"cannot load the tokenizer: {e}") from None
