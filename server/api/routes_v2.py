"""KServe v2 / Open Inference Protocol routes, so KServe and Triton HTTP clients can talk to the server.

``POST /v2/models/{name}/infer`` takes one BYTES input tensor of texts, as JSON data or with the binary
tensor data extension (what Triton's clients send by default; ``server/api/tensors.py``), with or without
a JSON ``Content-Type``, and answers the tensors ``label`` (BYTES), ``score`` (FP32),
``exit_layer`` (INT32), ``num_layers_run`` (INT32) and ``truncated`` (BOOL); ``probs`` (FP32, shape
[n, labels]) on request, and ``full_depth_agreement`` (FP32, the trust figure); ``deadline_exit`` (BOOL)
is sent by default for best-effort requests. Request ``parameters`` take the v1 options (speed,
criterion, max_layers, deadline_ms, on_deadline, overload_max_accuracy_drop, accuracy targets); the reply's
parameters say the speed and criterion used, and whether overload degraded them. Outputs come back as
binary tensors when asked (``parameters.binary_data`` per output, or ``binary_data_output`` for all).
Request parameters that are neither options nor the protocol's are refused (422), as on v1. Errors have
the protocol's body, ``{"error": "<message>"}`` (with ``type`` and ``field`` beside it), and "not ready"
is a 400, as the protocol's health endpoints define it.
"""

from __future__ import annotations

import importlib.metadata
import math
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from server.api.errors import ApiError, error_response
from server.api.json_body import StrictJSONRoute, is_json_content_type, parse_json_strict
from server.api.routes_v1 import ERROR_RESPONSES
from server.api.schemas import RequestOptions, check_texts
from server.api.schemas_v2 import (
    InferInputTensor,
    InferOutputTensor,
    InferRequest,
    InferRequestedOutput,
    InferResponse,
    ModelMetadata,
    TensorMetadata,
)
from server.api.state import (
    AppState,
    StateDep,
    build_options,
    check_num_inputs,
    disconnect_watch,
    request_start_s,
    timing_headers,
)
from server.api.tensors import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    binary_reply,
    decode_bytes_tensor,
    encode_tensor,
    split_body,
)
from server.engine.errors import InvalidRequestError, ModelNotFoundError
from server.engine.types import ClassifyResult, ModelInfo

SERVER_NAME = "exitserve"
PROTOCOL_VERSION = "2"
INPUT_NAME = "text"
PAIR_INPUT_NAME = "text_pair"  # the second tensor of a pair model's request
# name -> (datatype, whether it is sent when the request names no outputs)
OUTPUTS: dict[str, tuple[str, bool]] = {
    "label": ("BYTES", True),
    "score": ("FP32", True),
    "exit_layer": ("INT32", True),
    "num_layers_run": ("INT32", True),
    "truncated": ("BOOL", True),
    "probs": ("FP32", False),
    "full_depth_agreement": ("FP32", False),
    "deadline_exit": ("BOOL", False),  # sent by default when the request is best effort
}
OPTION_PARAMETERS = frozenset(RequestOptions.model_fields)
# The protocol's own request parameters that mean something here: binary outputs, and Triton's timeout
# (microseconds), taken as the deadline when no deadline_ms is given.
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "timeout"})


def server_version() -> str:
    try:
        return importlib.metadata.version("exitserve")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# The infer body is read by hand (a JSON header may be followed by binary tensors), so its schema is
# given to the OpenAPI document here.
INFER_BODY = InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")
INFER_BODY_DEFS = INFER_BODY.pop("$defs", {})
INFER_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": INFER_BODY},
            BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


router = APIRouter(route_class=StrictJSONRoute, prefix="/v2", tags=["kserve-v2"])


def _served_model(state: AppState, name: str, version: str | None) -> ModelInfo:
    info = state.require_engine().model_info
    if name != info.name or (version is not None and version != info.version):
        wanted = name if version is None else f"{name} version {version}"
        raise ModelNotFoundError(
            f"no model {wanted!r}; this server serves {info.name!r} version {info.version}"
        )
    return info


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def _inputs_of(tensors: list[InferInputTensor], binary: bytes) -> list[str] | list[tuple[str, str]]:
    """The texts of the 'text' tensor, or with a second 'text_pair' tensor of the same shape, the pairs
    (binary data: the first tensor's bytes, then the second's)."""
    if len(tensors) == 1:
        return _texts_of(tensors[0], binary)
    first, second = tensors
    if second.name != PAIR_INPUT_NAME:
        raise InvalidRequestError(
            f"a second input tensor must be named {PAIR_INPUT_NAME!r}, not {second.name!r}", "inputs[1].name"
        )
    size = (first.parameters or {}).get("binary_data_size")
    split = size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= len(binary) else 0
    texts = _texts_of(first, binary[:split], 0)
    pairs = _texts_of(second, binary[split:], 1)
    if first.shape != second.shape:
        raise InvalidRequestError(
            f"inputs[1].shape {second.shape} differs from inputs[0].shape {first.shape}", "inputs[1].shape"
        )
    return list(zip(texts, pairs, strict=True))


def _texts_of(tensor: InferInputTensor, binary: bytes, index: int = 0) -> list[str]:
    """The texts of one input tensor (JSON data, or its binary data after the JSON header), checked
    against its datatype and shape."""
    field = f"inputs[{index}]"
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            f"{field}.datatype must be BYTES, not {tensor.datatype}", f"{field}.datatype"
        )
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise InvalidRequestError(f"{field} has both data and binary_data_size", f"{field}.data")
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise InvalidRequestError(
                f"{field}.parameters.binary_data_size {size!r} is not the {len(binary)} bytes after the "
                "JSON header",
                f"{field}.parameters.binary_data_size",
            )
        texts: list[Any] = decode_bytes_tensor(binary, f"{field}.data")
    elif tensor.data is None:
        raise InvalidRequestError(f"{field} has no data (nor binary_data_size)", f"{field}.data")
    else:
        if binary:
            raise InvalidRequestError(
                f"{len(binary)} bytes follow the JSON header but no tensor has binary_data_size", field
            )
        texts = _flatten(tensor.data)
    num_elements = 1
    for dim in tensor.shape:
        num_elements *= dim
    if any(dim < 0 for dim in tensor.shape) or num_elements != len(texts):
        message = f"{field}.shape {tensor.shape} does not match its {len(texts)} data elements"
        raise InvalidRequestError(message, f"{field}.shape")
    try:
        return check_texts(texts, f"{field}.data")
    except PydanticCustomError as e:
        raise InvalidRequestError(str(e), f"{field}.data") from None


def _options_of(parameters: dict[str, Any] | None) -> RequestOptions:
    """The option parameters, validated like v1 fields; an unknown parameter is refused (422), as v1
    refuses unknown fields."""
    parameters = parameters or {}
    for key in parameters:
        if key not in OPTION_PARAMETERS and key not in PROTOCOL_PARAMETERS:
            accepted = ", ".join(sorted(OPTION_PARAMETERS | PROTOCOL_PARAMETERS))
            raise InvalidRequestError(
                f"unknown request parameter {key!r}; parameters: {accepted}", f"parameters.{key}"
            )
    known: dict[str, Any] = {k: v for k, v in parameters.items() if k in OPTION_PARAMETERS}
    timeout_us = parameters.get("timeout")
    if timeout_us is not None and "deadline_ms" not in known:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us <= 0:
            raise InvalidRequestError(
                "parameters.timeout must be a positive integer (microseconds)", "parameters.timeout"
            )
        known["deadline_ms"] = max(1, math.ceil(timeout_us / 1000))
    try:
        return RequestOptions.model_validate(known)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", "parameters", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from None


def _output_names(
    requested: list[InferRequestedOutput] | None, info: ModelInfo, best_effort: bool
) -> list[str]:
    """The outputs to send: those asked for (each must exist), else the default ones."""
    if requested is None:
        names = [name for name, (_, by_default) in OUTPUTS.items() if by_default]
        return [*names, "deadline_exit"] if best_effort else names
    names = [output.name for output in requested]
    for index, output in enumerate(requested):
        for key, value in (output.parameters or {}).items():
            if key != "binary_data" or not isinstance(value, bool):
                raise InvalidRequestError(
                    f"outputs[{index}].parameters: only binary_data (true or false) is supported, "
                    f"not {key!r}",
                    f"outputs[{index}].parameters.{key}",
                )
    for index, name in enumerate(names):
        if name not in OUTPUTS:
            known = ", ".join(OUTPUTS)
            raise InvalidRequestError(f"unknown output {name!r}; outputs: {known}", f"outputs[{index}].name")
        if name == "full_depth_agreement" and (
            info.calibration_table is None or info.calibration_table.agreement_table is None
        ):
            raise InvalidRequestError(
                "this model's calibration has no trust table (recalibrate it to get one)",
                f"outputs[{index}].name",
            )
    return names


def _reply_parameters(result: ClassifyResult) -> dict[str, Any]:
    parameters: dict[str, Any] = {"speed": result.speed, "criterion": str(result.criterion)}
    if result.degraded:
        parameters.update(
            degraded=True,
            requested_speed=result.requested_speed,
            requested_criterion=str(result.requested_criterion),
            predicted_accuracy_drop=result.predicted_drop_pts,
        )
    return parameters


def _output_tensors(result: ClassifyResult, info: ModelInfo, names: list[str]) -> list[InferOutputTensor]:
    rows = result.rows
    n = len(rows)
    columns: dict[str, tuple[list[int], list[Any]]] = {
        "label": ([n], [r.label for r in rows]),
        "score": ([n], [r.score for r in rows]),
        "exit_layer": ([n], [r.exit_layer for r in rows]),
        "num_layers_run": ([n], [r.num_layers_run for r in rows]),
        "truncated": ([n], [r.truncated for r in rows]),
        "probs": ([n, len(info.labels)], [p for r in rows for p in r.probs]),
        "full_depth_agreement": ([n], [r.full_depth_agreement for r in rows]),
        "deadline_exit": ([n], [r.deadline_exit for r in rows]),
    }
    return [
        InferOutputTensor(name=name, datatype=OUTPUTS[name][0], shape=columns[name][0], data=columns[name][1])
        for name in names
    ]


@router.get("", tags=["kserve-v2"])
async def server_metadata() -> dict[str, Any]:
    """Server name, version and supported extensions."""
    return {"name": SERVER_NAME, "version": server_version(), "extensions": ["binary_tensor_data"]}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """The process is alive."""
    return {"live": True}


NOT_READY: dict[int | str, dict[str, Any]] = {
    400: {"description": "not ready (loading or draining): the protocol's 4xx for false"}
}


def _not_ready(state: AppState) -> Any:
    reason = "draining" if state.draining else "the engine is not ready"
    return error_response(400, "not_ready", reason, flavour="v2")


@router.get("/health/ready", responses=NOT_READY)
async def ready(state: StateDep) -> Any:
    """200 when ready to serve, else 400 (the protocol's health endpoints answer false with a 4xx)."""
    if state.is_ready():
        return {"ready": True}
    return _not_ready(state)


def _metadata(info: ModelInfo) -> ModelMetadata:
    return ModelMetadata(
        name=info.name,
        versions=[info.version],
        platform=SERVER_NAME,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])]
        + (
            [TensorMetadata(name=PAIR_INPUT_NAME, datatype="BYTES", shape=[-1])]
            if info.input_kind == "pair"
            else []
        ),
        outputs=[
            TensorMetadata(name=out, datatype=dtype, shape=[-1, len(info.labels)] if out == "probs" else [-1])
            for out, (dtype, _) in OUTPUTS.items()
        ],
    )


def _model_ready(state: AppState, info: ModelInfo) -> Any:
    if state.is_ready():
        return {"name": info.name, "ready": True}
    return _not_ready(state)


async def _read_infer_request(request: Request) -> tuple[InferRequest, bytes]:
    """The request's JSON (validated) and the binary tensor bytes after it (none for plain JSON)."""
    header_length = request.headers.get(HEADER_LENGTH)
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_content_type(content_type):
        media_type = content_type.split(";", 1)[0].strip().lower()
        if header_length is None or media_type != BINARY_CONTENT_TYPE:
            raise ApiError(
                415,
                "unsupported_media_type",
                "send JSON (Content-Type: application/json, or none), or binary tensor data with an "
                "Inference-Header-Content-Length header",
            )
    head, binary = split_body(await request.body(), header_length)
    data = parse_json_strict(head)
    try:
        return InferRequest.model_validate(data), binary
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from None


async def _infer(state: AppState, info: ModelInfo, request: Request) -> Response:
    engine = state.require_engine()
    body, binary = await _read_infer_request(request)
    texts = _inputs_of(body.inputs, binary)
    check_num_inputs(len(texts), state.settings, "inputs[0].data")
    options = build_options(_options_of(body.parameters), info, state.settings, request_start_s(request))
    output_names = _output_names(body.outputs, info, options.best_effort)
    if body.outputs is None:  # binary_data_output: every output in binary
        all_binary = bool((body.parameters or {}).get("binary_data_output"))
        as_binary = dict.fromkeys(output_names, all_binary)
    else:
        as_binary = {o.name: bool((o.parameters or {}).get("binary_data")) for o in body.outputs}
    result = await engine.classify(
        texts, options, disconnect=disconnect_watch(request.scope, request.receive)
    )
    reply = InferResponse(
        model_name=result.model,
        model_version=result.version,
        id=body.id,
        parameters=_reply_parameters(result),
        outputs=_output_tensors(result, info, output_names),
    )
    headers = timing_headers(result)
    if not any(as_binary.values()):
        return Response(
            reply.model_dump_json(exclude_none=True), media_type="application/json", headers=headers
        )
    blobs = []
    for tensor in reply.outputs:
        if as_binary[tensor.name]:
            assert tensor.data is not None
            blob = encode_tensor(tensor.datatype, tensor.data)
            tensor.parameters, tensor.data = {"binary_data_size": len(blob)}, None
            blobs.append(blob)
    content, binary_headers = binary_reply(reply.model_dump(exclude_none=True), blobs)
    return Response(content, media_type=BINARY_CONTENT_TYPE, headers={**headers, **binary_headers})


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERROR_RESPONSES)
async def model_metadata(name: str, state: StateDep) -> ModelMetadata:
    """The model's input and output tensors."""
    return _metadata(_served_model(state, name, None))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERROR_RESPONSES)
async def model_version_metadata(name: str, version: str, state: StateDep) -> ModelMetadata:
    """The model's input and output tensors, if ``version`` is the one served."""
    return _metadata(_served_model(state, name, version))


@router.get("/models/{name}/ready", responses=ERROR_RESPONSES)
async def model_ready(name: str, state: StateDep) -> Any:
    """200 when the model serves requests, else 503."""
    return _model_ready(state, _served_model(state, name, None))


@router.get("/models/{name}/versions/{version}/ready", responses=ERROR_RESPONSES)
async def model_version_ready(name: str, version: str, state: StateDep) -> Any:
    """200 when this version serves requests, else 503."""
    return _model_ready(state, _served_model(state, name, version))


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=INFER_OPENAPI,
)
async def infer(name: str, request: Request, state: StateDep) -> Response:
    """Classify the texts of one BYTES tensor."""
    return await _infer(state, _served_model(state, name, None), request)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    responses=ERROR_RESPONSES,
    openapi_extra=INFER_OPENAPI,
)
async def infer_version(name: str, version: str, request: Request, state: StateDep) -> Response:
    """Classify the texts of one BYTES tensor with this version of the model."""
    return await _infer(state, _served_model(state, name, version), request)
