"""One JSON file per run: settings, machine, commit, target, dataset and results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from loadtest.generator import RunResult
from loadtest.machine import git_commit, machine_info, now_iso


def describe_target(url: str, api_key: str | None = None) -> dict[str, Any]:
    """What the server says it serves (``GET /v1/models``), best effort."""
    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    try:
        with httpx.Client(timeout=5.0, trust_env=False, headers=headers) as client:
            reply = client.get(f"{url}/v1/models")
        if reply.status_code == 200:
            body: dict[str, Any] = reply.json()
            return {"url": url, "models": body}
    except (httpx.HTTPError, ValueError):
        pass
    return {"url": url}


def run_document(
    name: str,
    result: RunResult,
    dataset: dict[str, Any],
    target: dict[str, Any],
    started_at: str | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "started_at": started_at or now_iso(),
        "machine": machine_info(),
        "commit": git_commit(),
        "target": target,
        "dataset": dataset,
        **result.to_json(),
    }


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    return path
