"""The server's one settings object: built from ``EXITSERVE_*`` environment variables and CLI flags.

Every setting is both an environment variable (``EXITSERVE_<NAME>``) and a flag (``--<name>`` with
dashes); a flag overrides the variable. Nothing else in the server reads ``os.environ``.
List settings take comma-separated values in both places (``EXITSERVE_CORS_ORIGINS=https://a,https://b``).
Optional settings take ``none`` to mean "not set".
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.engine.types import BatchingMode, EngineConfig

ENV_PREFIX = "EXITSERVE_"
MIB = 1 << 20
_NONE_STRINGS = frozenset({"", "none", "null"})
# Routes that answer without an API key unless configured otherwise: probes and scrapers carry no key.
DEFAULT_OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/health")


class Settings(BaseSettings):
    """Serve an early-exit classifier over HTTP. Each flag is also an env var, EXITSERVE_<NAME>."""

    # (The docstring above is the command line's --help text. In code: build Settings explicitly, as the
    # tests do, or with load_settings for the command line.)

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        frozen=True,
        # The command line (load_settings): --max-batch-size, values always given (--auto-adjust true,
        # --max-queue-wait-ms none), as documented; parsed only when load_settings asks for it.
        cli_prog_name="python -m server",
        cli_kebab_case=True,
        cli_implicit_flags=False,
        cli_exit_on_error=True,
    )

    # --- model --------------------------------------------------------------------------------------
    store: Path = Field(default=Path("store"), description="model store directory")
    model: str = Field(
        default="spam-minilm", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="model name to serve"
    )
    model_version: str | None = Field(default=None, description="model version; none = the latest")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for torch; none = cores - 1 (at least 1), leaving a core to the front end",
    )
    device: str = Field(
        default="cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$", description="torch device: cpu, cuda, cuda:N"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32",
        description="encoder weights dtype (half precisions on CUDA only; ramps and exit decisions stay "
        "float32)",
    )
    cuda_graphs: bool = Field(
        default=True,
        description="on CUDA, capture each layer step for row buckets up to max-batch-size and token "
        "buckets up to the model's max_seq_length at start-up, and replay them (ignored on CPU)",
    )

    # --- HTTP ---------------------------------------------------------------------------------------
    frontends: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="HTTP front-end processes on one port; 1 = one process with the engine core as a "
        "thread, N > 1 = N front ends feeding one engine-core process; none = chosen for the machine "
        "(CPU: 1 up to 2 cores, 2 up to 8, then cores / 4 up to 4; CUDA: cores / 2 up to 8)",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    max_body_bytes: int = Field(default=2 * MIB, gt=0, description="request body cap in bytes (else 413)")
    api_key: SecretStr | None = Field(
        default=None,
        description="require 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (prefer the env var)",
    )
    open_paths: Annotated[list[str], NoDecode] = Field(
        default=list(DEFAULT_OPEN_PATHS), description="paths that need no API key (comma-separated)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="allowed CORS origins (comma-separated); CORS is off if empty"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="log level"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="text, or json: one object per line with time, level, logger, message, request_id",
    )
    drain_timeout_s: float = Field(
        default=30.0, gt=0, description="on SIGTERM, how long in-flight requests may take to finish"
    )
    # Longer than any client pool or load balancer idle timeout (httpx 5 s, ALB 60 s): if the server closed
    # an idle connection at the moment a client reused it, that request would die without an answer.
    keep_alive_timeout_s: float = Field(
        default=75.0, gt=0, description="how long an idle keep-alive connection stays open"
    )
    # Connection hardening (server/http_protocol.py): idle or slow clients cannot hold descriptors or
    # memory. Limits as nginx and Go's net/http set theirs.
    request_head_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a connection must send a complete request head (request line + headers) within this "
        "many seconds of opening, or of its first byte after a keep-alive pause; else it is closed (408)",
    )
    max_header_bytes: int = Field(
        default=32 * 1024, ge=1024, description="request line plus headers, in bytes (else 431, closed)"
    )
    max_headers: int = Field(default=100, ge=8, description="header fields per request (else 431, closed)")
    max_request_line_bytes: int = Field(
        default=8192, ge=256, description="request target (URL) length in bytes (else 414, closed)"
    )
    max_connections: int | None = Field(
        default=None,
        gt=0,
        description="open connections; at the cap the longest-idle one is closed for a new one, and with "
        "none idle the new one gets 503; none = from the open-file limit (raised to its hard limit at start)",
    )

    # --- engine -------------------------------------------------------------------------------------
    max_batch_size: int = Field(default=64, gt=0, description="rows per layer step")
    max_inflight_rows: int | None = Field(
        default=None,
        gt=0,
        description="refill: rows holding hidden states at once; none = max_batch_size (raise it on a GPU)",
    )
    max_batch_tokens: int = Field(default=16384, gt=0, description="padded tokens per layer step")
    max_wait_ms: float = Field(default=2.0, ge=0, description="how long a lone request waits for company")
    max_queue_size: int = Field(default=1024, gt=0, description="rows waiting for admission (else 429)")
    max_queue_wait_ms: float | None = Field(
        default=500.0,
        gt=0,
        description="requests without a deadline are refused (429) when their predicted queue wait "
        "exceeds this; requests with a deadline are refused when their predicted answer comes after it; "
        "none = no bound",
    )
    max_inputs_per_request: int = Field(default=256, gt=0, description="inputs per request (else 413)")
    batching: BatchingMode = Field(default=BatchingMode.REFILL, description="batching mode: refill | shrink")
    default_deadline_ms: int | None = Field(
        default=None, gt=0, description="deadline for requests that set none (else 504); none = no deadline"
    )
    overload_max_accuracy_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="under overload, requests that set no speed may run faster calibrated settings that "
        "lose at most this many accuracy points against full depth (calibrated upper bound) before any is "
        "refused with 429; a request's own overload_max_accuracy_drop overrides it; none = never degrade",
    )
    target_latency_ms: float | None = Field(
        default=None,
        gt=0,
        description="latency target for requests without a deadline that allow degradation: they run a "
        "faster setting when predicted to be answered later than this; none = degrade for deadlines only",
    )
    strict_length: bool = Field(
        default=False, description="refuse inputs longer than the model takes (413) instead of truncating"
    )
    step_timeout_s: float = Field(
        default=30.0, gt=0, description="a layer step running longer than this means the engine hung"
    )
    guard_sample_fraction: float = Field(
        default=0.01, ge=0, le=1, description="share of early exits re-run to full depth to watch accuracy"
    )
    auto_adjust: bool = Field(
        default=False, description="move the default speed to keep live agreement at its target"
    )
    auto_adjust_target_agreement: float | None = Field(
        default=None, gt=0, le=1, description="auto-adjust target; none = the calibrated agreement"
    )

    @field_validator(
        "model_version",
        "default_deadline_ms",
        "auto_adjust_target_agreement",
        "max_queue_wait_ms",
        "overload_max_accuracy_drop",
        "target_latency_ms",
        "max_connections",
        mode="before",
    )
    @classmethod
    def _none_strings(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _NONE_STRINGS:
            return None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _real_api_key(cls, value: Any) -> Any:
        # A key that is set must be a key: "", "none" or "changeme" would otherwise disable auth (or
        # guard it with a guessable word) without a word. Unset the variable to run without auth.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and _is_placeholder_key(value):
            raise ValueError(
                "the API key is empty or a placeholder; set a real key, or unset EXITSERVE_API_KEY to run "
                "without authentication"
            )
        return value

    @field_validator("open_paths", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("max_wait_ms", "drain_timeout_s", "step_timeout_s", "request_head_timeout_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    def num_frontends(self, num_cores: int | None = None) -> int:
        """``frontends``, or the machine's default. On 2 cores, 2 front ends served 1.2-1.4x the requests
        of one on the tiny model but only 1.08x on the default model, and under 2x overload their work
        (refusing half the requests) took CPU from the model: goodput 72-111 % of capacity in the e2e
        runs seen, against 93-108 % for one process. So one up to 2 cores, then 2, then cores / 4. A GPU
        needs more to stay fed."""
        if self.frontends is not None:
            return self.frontends
        cores = num_cores if num_cores is not None else available_cores()
        if self.device.startswith("cuda"):
            return max(1, min(8, cores // 2))
        return 1 if cores <= 2 else max(2, min(4, cores // 4))

    def engine_config(self) -> EngineConfig:
        """The engine's knobs, taken from these settings."""
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_wait_ms=self.max_wait_ms,
            max_queue_size=self.max_queue_size,
            max_queue_wait_ms=self.max_queue_wait_ms,
            target_latency_ms=self.target_latency_ms,
            max_inputs_per_request=self.max_inputs_per_request,
            mode=self.batching,
            max_inflight_rows=self.max_inflight_rows,
            device=self.device,
            dtype=self.dtype,
            cuda_graphs=self.cuda_graphs,
            strict_length=self.strict_length,
            step_timeout_s=self.step_timeout_s,
            guard_sample_fraction=self.guard_sample_fraction,
            auto_adjust=self.auto_adjust,
            auto_adjust_target_agreement=self.auto_adjust_target_agreement,
        )


_PLACEHOLDER_KEYS = frozenset(
    {"changeme", "change-me", "change_me", "secret", "password", "apikey", "api-key", "your-api-key",
     "yourapikey", "todo", "fixme", "default", "test", "example", "placeholder", "key", "token"}
)  # fmt: skip


def _is_placeholder_key(key: str) -> bool:
    """Empty, a "not set" word, an unexpanded template (``${X}``, ``<key>``), or a well-known placeholder."""
    text = key.strip().lower()
    if text in _NONE_STRINGS or text in _PLACEHOLDER_KEYS or len(set(text)) == 1:
        return True
    return text.startswith("${") or (text.startswith("<") and text.endswith(">"))


def flag_name(field_name: str) -> str:
    """``max_batch_size`` -> ``--max-batch-size``."""
    return "--" + field_name.replace("_", "-")


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container
    limited to 2 CPUs on a 64-core node has 2, not 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def load_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from env vars overridden by flags in ``argv`` (pydantic-settings' CLI: one kebab-case flag
    per setting, ``--help`` lists each with its env var and default). Exits with status 2 on invalid
    input, naming both the flag and the variable."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return Settings(_cli_parse_args=args)  # type: ignore[call-arg]
    except ValidationError as e:
        problems = []
        for error in e.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            problems.append(f"{flag_name(name)} / {ENV_PREFIX}{name.upper()}: {error['msg']}")
        sys.stderr.write(f"usage: {CLI_PROG} [-h] [options]\n{CLI_PROG}: error: {'; '.join(problems)}\n")
        raise SystemExit(2) from None


CLI_PROG = "python -m server"


def _document_env_vars() -> None:
    """``--help`` names each setting's environment variable beside its flag (pydantic-settings' CLI prints
    the description and the default)."""
    for name, info in Settings.model_fields.items():
        info.description = f"{info.description} [env {ENV_PREFIX}{name.upper()}]"
    Settings.model_rebuild(force=True)


_document_env_vars()
