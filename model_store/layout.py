"""Where a model store keeps its versions, and reading a version's manifest. Pure Python (no torch):
an HTTP front end resolves its model's directory and manifest without loading the weights."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import ValidationError

from model_store.errors import CorruptFileError, MissingFileError, ModelNotFoundError
from model_store.manifest import MANIFEST_FILE, Manifest

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _version_key(version: str) -> tuple[int, int | str]:
    # Numeric versions sort numerically and after any non-numeric ones.
    return (1, int(version)) if version.isdigit() else (0, version)


class StoreLayout:
    """A directory of models, each a directory of versions (paths only: no torch, no weights read)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def list_models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.list_versions(p.name))

    def list_versions(self, name: str) -> list[str]:
        model_dir = self.root / name
        if not _NAME_RE.match(name) or not model_dir.is_dir():
            return []
        versions = [p.name for p in model_dir.iterdir() if p.is_dir() and (p / MANIFEST_FILE).exists()]
        return sorted(versions, key=_version_key)

    def latest_version(self, name: str) -> str:
        versions = self.list_versions(name)
        if not versions:
            known = ", ".join(self.list_models()) or "none"
            raise ModelNotFoundError(f"no model {name!r} in store {self.root} (models: {known})")
        return versions[-1]

    def version_dir(self, name: str, version: str | None = None) -> Path:
        version = version or self.latest_version(name)
        path = self.root / name / version
        if not _NAME_RE.match(name) or not _NAME_RE.match(version) or not path.is_dir():
            raise ModelNotFoundError(f"no version {version!r} of model {name!r} in store {self.root}")
        return path

    def next_version(self, name: str) -> str:
        numeric = [int(v) for v in self.list_versions(name) if v.isdigit()]
        return str(max(numeric, default=0) + 1)


def read_manifest(path: Path) -> Manifest:
    """Read and validate ``path/manifest.json``."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise MissingFileError(manifest_path, "manifest is missing")
    try:
        return Manifest.model_validate_json(manifest_path.read_bytes())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise CorruptFileError(manifest_path, f"invalid manifest at {where}: {first['msg']}") from None
