"""The Open Inference Protocol's binary tensor data extension: what Triton's clients send by default.

A request or reply with binary tensors is a JSON header followed by the raw tensors in tensor order; the
``Inference-Header-Content-Length`` header gives the JSON part's length, and each binary tensor says its
byte size in ``parameters.binary_data_size``. BYTES elements are a 4-byte little-endian length and the
bytes; FP32/INT32 little-endian; BOOL one byte per element (Triton's ``serialize_byte_tensor`` and
``np.tobytes``).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

from server.api.errors import ApiError

HEADER_LENGTH = "inference-header-content-length"
BINARY_CONTENT_TYPE = "application/octet-stream"
_PACKERS = {"FP32": "<{}f", "INT32": "<{}i", "BOOL": "<{}?"}


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensors) of a request body; the whole body is JSON without the header."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= len(body):
        raise ApiError(
            400,
            "invalid_request",
            f"Inference-Header-Content-Length {header_length!r} is not a length within the "
            f"{len(body)}-byte body",
        )
    return body[:length], body[length:]


def decode_bytes_tensor(data: bytes, field: str) -> list[str]:
    """The UTF-8 texts of a binary BYTES tensor."""
    texts: list[str] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise ApiError(400, "invalid_request", f"{field}: a BYTES element's length is cut short")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > len(data):
            raise ApiError(400, "invalid_request", f"{field}: a BYTES element runs past its tensor's data")
        try:
            texts.append(data[offset : offset + size].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(
                400, "invalid_utf8", f"{field}[{len(texts)}] is not valid UTF-8 (byte {e.start})"
            ) from None
        offset += size
    return texts


def encode_tensor(datatype: str, values: Sequence[Any]) -> bytes:
    """One output tensor's raw bytes."""
    if datatype == "BYTES":
        parts = []
        for value in values:
            raw = str(value).encode("utf-8")
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return struct.pack(_PACKERS[datatype].format(len(values)), *values)


def binary_reply(header: dict[str, Any], blobs: Sequence[bytes]) -> tuple[bytes, dict[str, str]]:
    """The reply body (JSON header, then the binary outputs) and the headers that describe it."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}
