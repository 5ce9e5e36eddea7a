"""server/settings.py: defaults, env vars, flags over env vars, --help, refusals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.__main__ import main
from server.engine.types import BatchingMode, EngineConfig
from server.settings import Settings, available_cores, flag_name, load_settings

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_exitserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("EXITSERVE_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    s = load_settings([])
    assert (s.store, s.model, s.model_version) == (Path("store"), "spam-minilm", None)
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.max_body_bytes == 2 * 1024 * 1024
    assert s.api_key is None and s.cors_origins == []
    assert s.open_paths == [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v2/health/live",
        "/v2/health/ready",
        "/health",
    ]
    assert s.batching is BatchingMode.REFILL
    assert s.default_deadline_ms is None and s.strict_length is False


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "EXITSERVE_STORE": "/models",
        "EXITSERVE_MODEL": "sst2",
        "EXITSERVE_MODEL_VERSION": "3",
        "EXITSERVE_PORT": "9001",
        "EXITSERVE_MAX_BATCH_SIZE": "16",
        "EXITSERVE_MAX_WAIT_MS": "0.5",
        "EXITSERVE_BATCHING": "shrink",
        "EXITSERVE_DEFAULT_DEADLINE_MS": "800",
        "EXITSERVE_STRICT_LENGTH": "true",
        "EXITSERVE_API_KEY": "key-7f3a9",
        "EXITSERVE_CORS_ORIGINS": "https://a.example, https://b.example",
        "EXITSERVE_LOG_LEVEL": "debug",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = load_settings([])
    assert (s.store, s.model, s.model_version, s.port) == (Path("/models"), "sst2", "3", 9001)
    assert (s.max_batch_size, s.max_wait_ms, s.batching) == (16, 0.5, BatchingMode.SHRINK)
    assert (s.default_deadline_ms, s.strict_length, s.log_level) == (800, True, "debug")
    assert s.api_key is not None and s.api_key.get_secret_value() == "key-7f3a9"
    assert "key-7f3a9" not in repr(s)  # the key never shows in logs of the settings
    assert s.cors_origins == ["https://a.example", "https://b.example"]


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXITSERVE_PORT", "9001")
    monkeypatch.setenv("EXITSERVE_MAX_QUEUE_SIZE", "10")
    monkeypatch.setenv("EXITSERVE_DEFAULT_DEADLINE_MS", "800")
    s = load_settings(["--port", "9100", "--batching", "shrink", "--default-deadline-ms", "none"])
    assert s.port == 9100  # flag wins
    assert s.max_queue_size == 10  # env var kept where no flag
    assert s.batching is BatchingMode.SHRINK
    assert s.default_deadline_ms is None


def test_engine_config() -> None:
    s = Settings(
        max_batch_size=8, max_batch_tokens=512, max_wait_ms=1.5, max_queue_size=99, batching="shrink"
    )
    assert s.engine_config() == EngineConfig(
        max_batch_size=8, max_batch_tokens=512, max_wait_ms=1.5, max_queue_size=99, mode=BatchingMode.SHRINK
    )
    tuned = Settings(guard_sample_fraction=0.2, auto_adjust=True, auto_adjust_target_agreement=0.95)
    config = tuned.engine_config()
    assert (config.guard_sample_fraction, config.auto_adjust, config.auto_adjust_target_agreement) == (
        0.2,
        True,
        0.95,
    )


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--port", "70000"], "--port"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--batching", "fifo"], "--batching"),
        (["--dtype", "int8"], "--dtype"),
        (["--device", "gpu"], "--device"),
        (["--max-wait-ms", "nan"], "--max-wait-ms"),
        (["--default-deadline-ms", "-5"], "--default-deadline-ms"),
        (["--strict-length", "maybe"], "--strict-length"),
    ],
)
def test_invalid_values_exit_2_naming_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "EXITSERVE_" in err


def test_unknown_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--max-batch", "3"])
    assert exit_info.value.code == 2


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert flag_name(name) in out, name
        assert f"EXITSERVE_{name.upper()}" in out.replace("\n", "").replace(" ", ""), name


@pytest.mark.parametrize(
    "value", ["", "  ", "none", "NULL", "changeme", "${API_KEY}", "<your-key>", "xxxxxxxx"]
)
def test_empty_or_placeholder_api_key_is_refused_at_start_up(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXITSERVE_API_KEY", value)
    with pytest.raises(SystemExit) as exit_info:
        load_settings([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "EXITSERVE_API_KEY" in err and "placeholder" in err
    with pytest.raises(SystemExit):  # the flag too
        load_settings(["--api-key", value])


def test_unset_api_key_means_no_auth_and_a_real_key_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings([]).api_key is None
    monkeypatch.setenv("EXITSERVE_API_KEY", "k-93f0c2a1")
    key = load_settings([]).api_key
    assert key is not None and key.get_secret_value() == "k-93f0c2a1"


def test_admission_and_connection_defaults() -> None:
    s = load_settings([])
    assert s.max_queue_wait_ms == 500.0 and s.engine_config().max_queue_wait_ms == 500.0
    assert load_settings(["--max-queue-wait-ms", "none"]).max_queue_wait_ms is None
    assert (s.request_head_timeout_s, s.max_header_bytes, s.max_headers) == (10.0, 32768, 100)
    assert (s.max_request_line_bytes, s.max_connections) == (8192, None)


def test_front_ends_default_for_the_machine() -> None:
    cpu, cuda = Settings(), Settings(device="cuda")
    assert [cpu.num_frontends(n) for n in (1, 2, 4, 8, 16, 64)] == [1, 1, 2, 2, 4, 4]
    assert [cuda.num_frontends(n) for n in (1, 2, 16, 64)] == [1, 1, 8, 8]
    assert Settings(frontends=3).num_frontends(64) == 3
    assert load_settings(["--frontends", "5"]).frontends == 5
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
