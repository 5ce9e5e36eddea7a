"""Prepare what the GPU checks need on the device machine, in ``carry/gpu`` (git-ignored, < 64 MiB):

* ``wheels/``: pydantic and its needs for Python 3.12 (that machine has torch, transformers and pytest,
  but not pydantic, which the manifest types use);
* ``model/``: the default model's latest float32 version with its weights stored as float16 (half the
  size; the tests load them into float32 parameters, so "float32" there means float32 compute on
  float16-rounded weights);
* ``test.jsonl``: the SpamAssassin test split ({text, label}).

Then ``scripts/gpu_check.sh`` runs the GPU tests and ``loadtest.gpu_efficiency`` there in one call:
``run(command="bash scripts/gpu_check.sh", carry=["carry/gpu"], timeout_s=540)``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "carry" / "gpu"
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LIMIT_BYTES = 60 * 2**20


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    argv += ["--python-version", "3.12", "--implementation", "cp", "-d", str(out)]
    for platform in PLATFORMS:
        argv += ["--platform", platform]
    subprocess.run([*argv, *pins], check=True)


def half_precision_copy(store: Path, model: str, out: Path) -> None:
    from model_store.layout import StoreLayout, read_manifest
    from model_store.manifest import MANIFEST_FILE, WEIGHTS_FILE

    layout = StoreLayout(store)
    versions = [
        v
        for v in layout.list_versions(model)
        if read_manifest(layout.version_dir(model, v)).quantization == "none"
    ]
    if not versions:
        raise SystemExit(f"no float32 version of {model} in {store}: build it first (make serve)")
    source = layout.version_dir(model, versions[-1])
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    weights = out / WEIGHTS_FILE
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = sha256(weights)
    manifest["provenance"]["gpu_bundle"] = f"weights of version {versions[-1]} stored as float16"
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def write_test_split(out: Path) -> None:
    from model_store.data import load_data

    splits = load_data("spamassassin", REPO / ".cache")
    with out.open("w") as f:
        for example in splits.test:
            f.write(json.dumps({"text": example.text, "label": example.label}) + "\n")


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    download_wheels(OUT / "wheels")
    half_precision_copy(REPO / "store", "spam-minilm", OUT / "model")
    write_test_split(OUT / "test.jsonl")
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {size / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        raise SystemExit(f"{OUT} is {size / 2**20:.1f} MiB, over the {LIMIT_BYTES / 2**20:.0f} MiB budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
