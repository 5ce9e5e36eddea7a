"""Loopback targets only: anything else is refused before a single request leaves."""

from __future__ import annotations

import pytest

from loadtest.__main__ import main
from loadtest.generator import LoadSettings
from loadtest.safety import NotLoopbackError, require_loopback


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://127.8.9.10:1",
        "http://[::1]:8000/",
        "http://localhost:80",
        "https://LOCALHOST",
    ],
)
def test_loopback_accepted(url: str) -> None:
    assert require_loopback(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://0.0.0.0:8000",
        "http://192.168.1.20",
        "http://example.com",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io:8000",
        "http://[::2]:8000",
        "ftp://127.0.0.1",
        "127.0.0.1:8000",
        "http://:8000",
    ],
)
def test_other_targets_refused(url: str) -> None:
    with pytest.raises(NotLoopbackError):
        require_loopback(url)
    with pytest.raises(NotLoopbackError):
        LoadSettings(url=url)


def test_cli_refuses_before_sending(tmp_path, capsys) -> None:
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"text": "hello", "label": "ham"}\n')
    out = tmp_path / "run.json"
    code = main(["run", "--url", "http://203.0.113.5:8000", "--dataset", str(dataset), "--out", str(out)])
    assert code == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert not out.exists()


def test_remote_targets_only_behind_the_explicit_flag() -> None:
    with pytest.raises(NotLoopbackError):
        LoadSettings(url="https://exitserve.example.com")
    allowed = LoadSettings(url="https://exitserve.example.com", allow_remote=True, api_key="secret-key")
    assert "secret-key" not in repr(allowed)  # never printed
    for bad in ("ftp://example.com", "example.com:8000", "http://"):
        with pytest.raises(NotLoopbackError):
            LoadSettings(url=bad, allow_remote=True)
