"""KServe v2 / Open Inference Protocol routes, so KServe and Triton HTTP clients can talk to the server.

``POST /v2/models/{name}/infer`` takes one BYTES input tensor of texts (JSON data; the binary tensor
extension is refused with 415) and answers the tensors ``label`` (BYTES), ``score`` (FP32),
``exit_layer`` (INT32), ``num_layers_run`` (INT32) and ``truncated`` (BOOL); ``probs`` (FP32, shape
[n, labels]) on request, and ``full_depth_agreement`` (FP32, the trust figure); ``deadline_exit`` (BOOL)
is sent by default for best-effort requests. Request ``parameters`` take the v1 options (speed,
criterion, max_layers, deadline_ms, on_deadline, overload_max_accuracy_drop, accuracy targets); the reply's
parameters say the speed and criterion used, and whether overload degraded them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from server.api.errors import ApiError, error_response
from server.api.json_body import StrictJSONRoute
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
    request_start_s,
    timing_headers,
)
from server.engine.errors import InvalidRequestError, ModelNotFoundError
from server.engine.types import ClassifyResult, ModelInfo

SERVER_NAME = "exitserve"
PROTOCOL_VERSION = "2"
INPUT_NAME = "text"
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
OPTION_PARAMETERS = tuple(RequestOptions.model_fields)


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


def _texts_of(tensor: InferInputTensor) -> list[str]:
    """The texts of the one input tensor, checked against its datatype and shape."""
    field = "inputs[0]"
    if tensor.datatype != "BYTES":
        raise InvalidRequestError(
            f"{field}.datatype must be BYTES, not {tensor.datatype}", f"{field}.datatype"
        )
    if tensor.parameters and "binary_data_size" in tensor.parameters:
        raise ApiError(415, "unsupported_media_type", "binary tensor data is not supported; send JSON data")
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
    """Known option parameters, validated like v1 fields; other parameters are ignored."""
    known = {k: v for k, v in (parameters or {}).items() if k in OPTION_PARAMETERS}
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
    return {"name": SERVER_NAME, "version": PROTOCOL_VERSION, "extensions": []}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    """The process is alive."""
    return {"live": True}


@router.get("/health/ready", responses={503: ERROR_RESPONSES[503]})
async def ready(state: StateDep) -> Any:
    """200 when ready to serve, else 503."""
    if state.is_ready():
        return {"ready": True}
    return error_response(503, "not_ready", "draining" if state.draining else "the engine is not ready")


def _metadata(info: ModelInfo) -> ModelMetadata:
    return ModelMetadata(
        name=info.name,
        versions=[info.version],
        platform=SERVER_NAME,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="BYTES", shape=[-1])],
        outputs=[
            TensorMetadata(name=out, datatype=dtype, shape=[-1, len(info.labels)] if out == "probs" else [-1])
            for out, (dtype, _) in OUTPUTS.items()
        ],
    )


def _model_ready(state: AppState, info: ModelInfo) -> Any:
    if state.is_ready():
        return {"name": info.name, "ready": True}
    return error_response(503, "not_ready", "draining" if state.draining else "the engine is not ready")


async def _infer(
    state: AppState, info: ModelInfo, body: InferRequest, request: Request, response: Response
) -> InferResponse:
    engine = state.require_engine()
    texts = _texts_of(body.inputs[0])
    check_num_inputs(len(texts), state.settings, "inputs[0].data")
    options = build_options(_options_of(body.parameters), info, state.settings, request_start_s(request))
    output_names = _output_names(body.outputs, info, options.best_effort)
    result = await engine.classify(texts, options, wait_disconnect=request.receive)
    response.headers.update(timing_headers(result))
    return InferResponse(
        model_name=result.model,
        model_version=result.version,
        id=body.id,
        parameters=_reply_parameters(result),
        outputs=_output_tensors(result, info, output_names),
    )


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


@router.post("/models/{name}/infer", response_model=InferResponse, responses=ERROR_RESPONSES)
async def infer(
    name: str, body: InferRequest, request: Request, response: Response, state: StateDep
) -> InferResponse:
    """Classify the texts of one BYTES tensor."""
    return await _infer(state, _served_model(state, name, None), body, request, response)


@router.post(
    "/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=ERROR_RESPONSES
)
async def infer_version(
    name: str, version: str, body: InferRequest, request: Request, response: Response, state: StateDep
) -> InferResponse:
    """Classify the texts of one BYTES tensor with this version of the model."""
    return await _infer(state, _served_model(state, name, version), body, request, response)
