"""Routes of text-embeddings-inference (TEI) and of the Hugging Face inference API, for their clients.

* ``POST /predict``: TEI's request (``inputs``: a text or a list of texts; ``truncate``, default false:
  an input longer than the model takes is refused with 413, as TEI does; ``raw_scores``;
  ``truncation_direction``) and reply: per input, every label with its probability, most probable first;
  one input -> one list, a list of inputs -> a list of lists.
* ``POST /``: the Hugging Face inference API's text classification, what
  ``huggingface_hub.InferenceClient(base_url).text_classification(text)`` sends (``inputs`` and
  ``parameters: {top_k, function_to_apply}``); always a list of lists (one per input), as that client
  reads it. Inputs are truncated, as that API does.
* ``GET /info`` (TEI's model description), ``GET /health`` (200 with an empty body, 503 when not ready).

exitserve's knobs are optional extra fields on both (``speed``, ``criterion``, ``deadline_ms``, accuracy
targets, ...: the v1 options); ``return_exit_layer: true`` adds ``exit_layer`` to each label entry. Sentence
pairs, raw scores and left truncation are refused (422) rather than answered wrongly. Errors carry TEI's
body, ``{"error": "<message>", "error_type": "<type>"}``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from server.api.errors import error_response
from server.api.json_body import StrictJSONRoute
from server.api.routes_v2 import server_version
from server.api.schemas import RequestOptions, check_texts
from server.api.state import (
    AppState,
    StateDep,
    build_options,
    check_num_inputs,
    disconnect_watch,
    request_start_s,
    timing_headers,
)
from server.engine.errors import InvalidRequestError
from server.engine.types import ClassifyOptions, ClassifyResult

router = APIRouter(route_class=StrictJSONRoute, tags=["tei"])

PAIRS_REFUSED = "this model classifies single texts; sentence pairs are not supported"


def _texts(value: Any) -> list[str]:
    """TEI's ``inputs``: a text, or a list of texts; pairs (lists of two texts) are refused."""
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        if isinstance(item, list):
            raise InvalidRequestError(PAIRS_REFUSED, f"inputs[{index}]")
    try:
        return check_texts(value)
    except PydanticCustomError as e:
        element = re.match(r"inputs\[\d+\]", str(e))
        raise InvalidRequestError(str(e), element.group(0) if element else "inputs") from None


class PredictRequest(RequestOptions):
    """``POST /predict`` (TEI)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    inputs: str | list[Any] = Field(description="a text or a list of texts")
    truncate: bool = Field(default=False, description="cut over-long inputs; false (TEI's default): 413")
    raw_scores: bool = Field(default=False, description="only false: replies are probabilities")
    truncation_direction: Literal["Right", "right"] = Field(default="Right", description="only Right")
    return_exit_layer: bool = Field(default=False, description="add exit_layer to each label entry")

    @field_validator("raw_scores")
    @classmethod
    def _probabilities_only(cls, value: bool) -> bool:
        if value:
            raise ValueError("raw_scores is not supported: exitserve answers with probabilities")
        return value


class HubParameters(RequestOptions):
    """The inference API's ``parameters`` for text classification, and exitserve's options."""

    top_k: int | None = Field(default=None, ge=1, description="the k most probable labels")
    function_to_apply: Literal["softmax"] | None = Field(
        default=None, description="only softmax: replies are probabilities"
    )
    return_exit_layer: bool = False


class HubRequest(RequestOptions):
    """``POST /`` (Hugging Face inference API text classification)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    inputs: str | list[Any]
    parameters: HubParameters | None = None


async def _classify(
    state: AppState, request: Request, texts: list[str], knobs: RequestOptions, refuse_truncated: bool
) -> tuple[ClassifyResult, list[str]]:
    engine = state.require_engine()
    check_num_inputs(len(texts), state.settings)
    info = engine.model_info
    options: ClassifyOptions = build_options(knobs, info, state.settings, request_start_s(request))
    if refuse_truncated:
        options = dataclasses.replace(options, refuse_truncated=True)
    result = await engine.classify(
        texts, options, disconnect=disconnect_watch(request.scope, request.receive)
    )
    return result, info.labels


def _reply(body: Any, result: ClassifyResult) -> Response:
    return Response(json.dumps(body), media_type="application/json", headers=timing_headers(result))


@router.post("/predict", summary="Classify (TEI's /predict)")
async def predict(body: PredictRequest, request: Request, state: StateDep) -> Response:
    """Every label's probability per input, most probable first (TEI's request and reply)."""
    texts = _texts(body.inputs)
    # A PredictRequest is RequestOptions plus TEI's fields: build_options reads only the options.
    result, labels = await _classify(state, request, texts, body, refuse_truncated=not body.truncate)
    ranked = _ranked(result, labels, None, body.return_exit_layer)
    return _reply(ranked[0] if isinstance(body.inputs, str) else ranked, result)


@router.post("/", summary="Classify (Hugging Face inference API, what InferenceClient sends)")
async def hub_classify(body: HubRequest, request: Request, state: StateDep) -> Response:
    """Per input, the labels with their probabilities, most probable first: always a list of lists."""
    texts = _texts(body.inputs)
    parameters = body.parameters or HubParameters()
    knobs = RequestOptions.model_validate(
        {
            **body.model_dump(include=set(RequestOptions.model_fields), exclude_none=True),
            **parameters.model_dump(include=set(RequestOptions.model_fields), exclude_none=True),
        }
    )
    result, labels = await _classify(state, request, texts, knobs, refuse_truncated=False)
    return _reply(_ranked(result, labels, parameters.top_k, parameters.return_exit_layer), result)


def _ranked(
    result: ClassifyResult, labels: list[str], top_k: int | None, exit_layer: bool
) -> list[list[dict[str, Any]]]:
    """Per input, every label (or the ``top_k`` most probable) with its probability, most probable first."""
    out = []
    for row in result.rows:
        order = sorted(range(len(row.probs)), key=lambda i: (-row.probs[i], i))[:top_k]
        entries: list[dict[str, Any]] = [{"label": labels[i], "score": row.probs[i]} for i in order]
        if exit_layer:
            for entry in entries:
                entry["exit_layer"] = row.exit_layer
        out.append(entries)
    return out


@router.get("/info", summary="The served model (TEI's /info)")
async def info(state: StateDep) -> dict[str, Any]:
    """TEI's model description: a classifier with its labels, and the server's limits."""
    model = state.require_engine().model_info
    settings = state.settings
    return {
        "model_id": model.name,
        "model_sha": model.version,
        "model_dtype": settings.dtype,
        "model_type": {
            "classifier": {
                "id2label": {str(i): label for i, label in enumerate(model.labels)},
                "label2id": {label: i for i, label in enumerate(model.labels)},
            }
        },
        "max_concurrent_requests": settings.max_queue_size,
        "max_input_length": model.max_seq_length,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_batch_requests": settings.max_batch_size,
        "max_client_batch_size": settings.max_inputs_per_request,
        "tokenization_workers": settings.num_frontends(),
        "version": server_version(),
        "sha": None,
        "docker_label": None,
    }


@router.get("/health", summary="200 when ready (TEI's /health)")
async def health(state: StateDep) -> Response:
    """200 with an empty body when the engine serves, else 503 (TEI's)."""
    if state.is_ready():
        return Response(status_code=200)
    reason = "draining" if state.draining else "the engine is not ready"
    return error_response(503, "not_ready", reason, flavour="tei")
