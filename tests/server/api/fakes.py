"""A fake engine with the Engine contract (start/stop/is_ready/model_info/classify) and no torch model.

Its answers are known in advance: a text of n words exits at layer min(n, max_layers, 4); a text that
contains "free" is spam (probs 0.1/0.9), any other is ham (0.8/0.2). It reports to the observer like
the real engine: one queue wait per request, one layer step per layer, one exit per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_store.criteria import Criterion
from server.engine.errors import NotReadyError
from server.engine.types import (
    ClassifyOptions,
    ClassifyResult,
    DisconnectWatch,
    EngineObserver,
    ModelInfo,
    RowOutcome,
)

NUM_LAYERS = 4
LABELS = ["ham", "spam"]
QUEUE_TIME_S = 0.0015
INFERENCE_TIME_S = 0.004
CALIBRATION: dict[str, object] = {
    "split": "validation",
    "num_examples": 100,
    "full_depth_accuracy": 0.97,
    "per_layer_accuracy": [0.9, 0.94, 0.96, 0.97],
    "points": [
        {
            "criterion": "normalized_entropy",
            "speed": 0.3,
            "accuracy": 0.96,
            "mean_exit_layer": 1.6,
            "layers_saved": 0.6,
            "expected_speedup": 2.5,
        }
    ],
}
FAKE_INFO = ModelInfo(
    name="fake",
    version="7",
    architecture="bert",
    num_layers=NUM_LAYERS,
    labels=LABELS,
    max_seq_length=32,
    default_criterion=Criterion.MAX_PROB,
    default_speed=0.25,
    calibration=CALIBRATION,
    provenance={"recipe": "test"},
)


def expected_exit_layer(text: str, max_layers: int | None = None) -> int:
    """The layer the fake engine answers ``text`` from."""
    return min(len(text.split()), max_layers or NUM_LAYERS, NUM_LAYERS)


@dataclass
class FakeEngine:
    """Scripted engine. Set ``error`` to make the next ``classify`` calls raise it."""

    observer: EngineObserver
    info: ModelInfo = FAKE_INFO
    error: Exception | None = None
    calls: list[tuple[list[str], ClassifyOptions]] = field(default_factory=list)
    started: bool = False
    stopped: bool = False
    drain_timeout_s: float | None = None

    async def start(self) -> None:
        self.started = True

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        self.stopped = True
        self.drain_timeout_s = drain_timeout_s

    def is_ready(self) -> bool:
        return self.started and not self.stopped

    @property
    def model_info(self) -> ModelInfo:
        return self.info

    async def classify(
        self,
        texts: list[str],
        options: ClassifyOptions,
        disconnect: DisconnectWatch | None = None,
    ) -> ClassifyResult:
        self.calls.append((texts, options))
        if self.error is not None:
            raise self.error
        if not self.is_ready():
            raise NotReadyError("engine is not ready")
        exit_layers = [expected_exit_layer(t, options.max_layers) for t in texts]
        self.observer.queue_waits([QUEUE_TIME_S])
        for layer in range(1, max(exit_layers) + 1):
            num_rows = sum(1 for e in exit_layers if e >= layer)
            self.observer.layer_step(layer, num_rows, num_rows * 8)
        rows = []
        for text, exit_layer in zip(texts, exit_layers, strict=True):
            self.observer.row_exited(exit_layer, NUM_LAYERS)
            probs = [0.1, 0.9] if "free" in text else [0.8, 0.2]
            index = probs.index(max(probs))
            rows.append(
                RowOutcome(
                    label=LABELS[index],
                    label_index=index,
                    score=probs[index],
                    probs=probs,
                    exit_layer=exit_layer,
                    num_layers_run=exit_layer,
                    truncated=len(text) > 100,
                )
            )
        return ClassifyResult(
            rows=rows,
            model=self.info.name,
            version=self.info.version,
            criterion=options.criterion,
            speed=options.speed,
            queue_time_s=QUEUE_TIME_S,
            inference_time_s=INFERENCE_TIME_S,
        )
