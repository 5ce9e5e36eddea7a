"""Errors raised by the model store. Each message names the file or thing at fault."""

from __future__ import annotations

from pathlib import Path


class ModelStoreError(Exception):
    """Base class for everything the model store refuses or cannot do."""


class ModelNotFoundError(ModelStoreError):
    """No such model, or no such version of it, in the store."""


class UnsupportedArchitectureError(ModelStoreError):
    """The encoder's ``model_type`` has no layer adapter."""


class UnsupportedDeviceError(ModelStoreError):
    """The version cannot run on the device or dtype asked for (an int8 version on a GPU)."""


class StoreFileError(ModelStoreError):
    """A problem with one file of a model version; ``path`` names it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MissingFileError(StoreFileError):
    """A file the manifest needs is absent."""


class CorruptFileError(StoreFileError):
    """A file is present but unreadable, truncated, or fails its checksum."""


class PickleRefusedError(StoreFileError):
    """A pickle-based weight file was found; only safetensors are ever loaded."""
