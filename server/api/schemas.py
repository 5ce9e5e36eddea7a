"""Request and response bodies of the v1 API: one pydantic schema per direction.

Requests are strict: wrong JSON types are refused rather than coerced ("0.5" is not a speed, "yes" is
not a boolean), unknown fields are refused (a typo like "sped" would otherwise be ignored), and
non-finite numbers are refused (Python's JSON parser reads ``NaN`` and ``1e999``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from model_store.policy import Criterion

MAX_DEADLINE_MS = 3_600_000  # one hour; longer is a client bug


class ErrorDetail(BaseModel):
    """What went wrong; ``field`` names the request field at fault, when there is one."""

    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx reply."""

    error: ErrorDetail


def check_inputs(value: Any, field: str = "inputs") -> list[str] | list[tuple[str, str]]:
    """Texts (see ``check_texts``), or a list of ``[text, text_pair]`` pairs of such texts."""
    if isinstance(value, list) and value and isinstance(value[0], list):
        pairs: list[tuple[str, str]] = []
        for index, pair in enumerate(value):
            if not isinstance(pair, list) or len(pair) != 2:
                raise PydanticCustomError(
                    "pair_shape", f"{field}[{index}] must be a [text, text_pair] pair of two strings"
                )
            a, b = check_texts(pair, f"{field}[{index}]")
            pairs.append((a, b))
        return pairs
    return check_texts(value, field)


def check_texts(value: Any, field: str = "inputs") -> list[str]:
    """A list of non-blank strings (a single string counts as one), or a validation error naming it."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list):
        raise PydanticCustomError("texts_type", f"{field} must be a string or a list of strings")
    if not texts:
        raise PydanticCustomError("texts_empty", f"{field} must hold at least one text")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise PydanticCustomError("text_type", f"{field}[{index}] must be a string")
        if not text.strip():
            raise PydanticCustomError("text_blank", f"{field}[{index}] is empty or whitespace only")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # JSON's "\ud800": a lone surrogate no tokenizer takes
                raise PydanticCustomError(
                    "text_unicode",
                    f"{field}[{index}] is not valid Unicode text: lone surrogate at character {e.start}",
                ) from None
    return texts


class RequestOptions(BaseModel):
    """Per-request knobs shared by the v1 and v2 routes; absent = the model's or server's default."""

    model_config = ConfigDict(strict=True, extra="forbid")

    speed: float | None = Field(
        default=None, ge=0.0, le=1.0, allow_inf_nan=False, description="0 = never exit early, 1 = fastest"
    )
    # Enums come as JSON strings: not strict, but only the listed values pass.
    criterion: Annotated[Criterion | None, Field(strict=False)] = None
    max_layers: int | None = Field(default=None, ge=1, description="run at most this many layers")
    max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="accuracy target instead of a speed: the fastest calibrated setting that loses at most "
        "this many percentage points against full depth (the reply says which speed and criterion it used)",
    )
    max_mean_exit_layer: float | None = Field(
        default=None,
        ge=1.0,
        allow_inf_nan=False,
        description="depth target instead of a speed: the most accurate calibrated setting whose mean exit "
        "layer is at most this",
    )
    deadline_ms: int | None = Field(
        default=None, ge=1, le=MAX_DEADLINE_MS, description="answer within this many ms, else 504"
    )
    on_deadline: Literal["error", "best_effort"] | None = Field(
        default=None,
        description="at the deadline: 'error' (default) answers 504; 'best_effort' answers each row from "
        "the deepest ramp computed by then (marked deadline_exit), 504 only if a row had no layer yet",
    )
    overload_max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="under overload, rather than 429, run a faster calibrated setting that loses at most "
        "this many accuracy points against full depth (the reply says degraded and the setting used); "
        "absent = the server's default for requests that set no speed",
    )


class ClassifyRequest(RequestOptions):
    """``POST /v1/classify``."""

    inputs: str | list[str] | list[tuple[str, str]] = Field(
        description="one text or a list of texts; for a pair model, a list of [text, text_pair] pairs"
    )
    return_probs: bool = Field(default=False, description="include every label's probability")

    @field_validator("inputs", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> list[str] | list[tuple[str, str]]:
        return check_inputs(value)

    @property
    def texts(self) -> list[str] | list[tuple[str, str]]:
        """The inputs as a list (of texts, or of pairs)."""
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)  # type: ignore[return-value]


class ClassifyResult(BaseModel):
    """The answer for one input."""

    label: str
    score: float = Field(description="probability of the label")
    exit_layer: int = Field(description="1-based layer whose ramp answered")
    num_layers_run: int
    truncated: bool = Field(description="the input was cut to the model's max sequence length")
    full_depth_agreement: float | None = Field(
        default=None,
        description="calibrated probability that this answer equals the full-depth answer (by exit layer "
        "and confidence); absent when the model's calibration has no such table",
    )
    deadline_exit: bool | None = Field(
        default=None, description="true: answered at the deadline from the deepest ramp computed"
    )
    probs: dict[str, float] | None = Field(default=None, description="only when return_probs is true")


class ClassifyResponse(BaseModel):
    """The answer for one request, in input order."""

    model: str
    version: str
    speed: float = Field(description="the speed the rows ran at (under overload, maybe degraded)")
    criterion: Criterion
    degraded: bool | None = Field(
        default=None, description="true: overload ran a faster setting than asked, within the allowed drop"
    )
    requested_speed: float | None = Field(default=None, description="when degraded: the speed asked for")
    requested_criterion: Criterion | None = Field(default=None, description="when degraded")
    predicted_accuracy_drop: float | None = Field(
        default=None, description="when degraded: calibrated accuracy drop of the setting used, in points"
    )
    results: list[ClassifyResult]


class ModelDescription(BaseModel):
    """One served model (``GET /v1/models``)."""

    name: str
    version: str
    architecture: str
    num_layers: int
    labels: list[str]
    max_seq_length: int
    default_criterion: Criterion
    default_speed: float
    criteria: list[Criterion]
    ready: bool
    input_kind: Literal["text", "pair"] = Field(
        default="text", description="text: inputs are texts; pair: inputs are [text, text_pair] pairs"
    )
    calibration: dict[str, Any] | None = Field(description="the manifest's speed/accuracy table")
    live_guard: dict[str, Any] | None = Field(
        default=None, description="live agreement of early exits with full depth, per speed bucket"
    )
    provenance: dict[str, Any]


class ModelList(BaseModel):
    """``GET /v1/models``."""

    models: list[ModelDescription]


class HealthStatus(BaseModel):
    """``GET /healthz`` and ``GET /readyz``."""

    status: str
