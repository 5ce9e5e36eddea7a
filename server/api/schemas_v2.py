"""Bodies of the KServe v2 / Open Inference Protocol routes (JSON tensor representation)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TensorMetadata(BaseModel):
    """Name, datatype and shape (-1 = any) of a tensor."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class InferInputTensor(BaseModel):
    """One input tensor: BYTES data as JSON strings, flat or nested by shape, or (binary tensor data
    extension) ``parameters.binary_data_size`` bytes after the JSON header and no ``data``."""

    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferRequestedOutput(BaseModel):
    """An output the client wants back."""

    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor] = Field(
        min_length=1, max_length=2, description="'text'; for a pair model also 'text_pair', of the same shape"
    )
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    """One output tensor: ``data``, or (binary) ``parameters.binary_data_size`` bytes after the header."""

    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    """The infer reply; ``parameters`` say which speed and criterion were used."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[InferOutputTensor]
