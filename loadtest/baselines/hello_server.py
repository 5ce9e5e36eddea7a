"""The front-end ceiling's reference: a FastAPI hello-world with a pydantic body and a JSON reply.

It does what every HTTP classifier must do and nothing else: parse and validate a ``{"inputs": [...]}``
body, answer one label per input. One process, uvicorn with httptools, no access log: what a hand-written
FastAPI wrapper costs before it runs any model. ``python -m loadtest.baselines.hello_server --port N``.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field


class Body(BaseModel):
    inputs: list[str] = Field(min_length=1, max_length=256)


class Result(BaseModel):
    label: str
    score: float


class Reply(BaseModel):
    results: list[Result]


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/classify")
    async def classify(body: Body) -> Reply:
        return Reply(results=[Result(label="ham", score=1.0) for _ in body.inputs])

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(), host=args.host, port=args.port, http="httptools", access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
