"""The shadow sampler: re-runs a sample of early exits to full depth and feeds the accuracy guard.

It owns its bookkeeping (which shadow row re-checks which early answer). Shadow rows belong to no client
request (``RowSpec.request_id`` is None): a failed shadow step is not a client-visible batch failure, and
dropping one shadow row never touches another.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_store.manifest import AgreementTable
from model_store.policy import CRITERION_CODES, Criterion
from server.engine.guard import AccuracyGuard, AutoAdjuster, speed_bucket
from server.engine.scheduler import RowExit, RowSpec, Scheduler
from server.engine.types import EngineConfig, EngineObserver

_FULL_DEPTH = CRITERION_CODES[Criterion.NORMALIZED_ENTROPY]


@dataclass(frozen=True)
class _Sampled:
    early_label: int
    speed: float
    speed_is_default: bool
    exit_layer: int
    confidence: float  # the early answer's top probability (the trust figure's bin)


class ShadowSampler:
    """Chooses early exits to re-run (in spare capacity only), compares, and moves the default speed."""

    def __init__(
        self,
        config: EngineConfig,
        num_layers: int,
        default_speed: float,
        expected_agreement: dict[str, float],
        observer: EngineObserver,
        trust: AgreementTable | None = None,
    ) -> None:
        self._trust = trust
        self.num_layers = num_layers
        self.guard = AccuracyGuard(config.guard_sample_fraction, expected_agreement)
        self.adjuster: AutoAdjuster | None = None
        if config.auto_adjust:
            target = config.auto_adjust_target_agreement or expected_agreement.get(
                speed_bucket(default_speed), 0.99
            )
            self.adjuster = AutoAdjuster(
                default_speed, target_agreement=target, window=config.auto_adjust_window
            )
        self._default_speed = default_speed
        self._observer = observer
        self._sampled: dict[int, _Sampled] = {}  # shadow row id -> the early answer it re-checks
        self.changed = True  # the live curve changed since ``live_guard`` was last read

    @property
    def sampling(self) -> bool:
        """Whether answered rows may be offered at all (a zero sample fraction: never)."""
        return self.guard.sample_fraction > 0.0

    @property
    def default_speed(self) -> float:
        return self.adjuster.speed if self.adjuster is not None else self._default_speed

    def offer(
        self, scheduler: Scheduler, row: RowSpec, row_exit: RowExit, speed: float, speed_is_default: bool
    ) -> None:
        """An answered row: maybe queue its full-depth re-run."""
        if not self.guard.should_sample(row_exit.exit_layer, self.num_layers):
            return
        shadow = RowSpec(
            row_id=scheduler.next_id(),
            request_id=None,
            token_ids=row.token_ids,
            criterion_code=_FULL_DEPTH,
            threshold=0.0,  # never exits early
            max_layers=self.num_layers,
            shadow=True,
        )
        if scheduler.add_shadow_row(shadow):
            self._sampled[shadow.row_id] = _Sampled(
                row_exit.label_index,
                speed,
                speed_is_default,
                row_exit.exit_layer,
                row_exit.probs[row_exit.label_index],
            )
        else:
            self._observer.guard_dropped(1)  # the shadow cap is reached
            self.changed = True

    def finished(self, row: RowSpec, row_exit: RowExit) -> None:
        """A shadow row reached full depth: tally agreement; maybe move the default speed."""
        sampled = self._sampled.pop(row.row_id, None)
        if sampled is None:
            return
        agreed = sampled.early_label == row_exit.label_index
        bucket = self.guard.record(sampled.speed, sampled.early_label, row_exit.label_index)
        self._observer.guard_result(bucket, agreed)
        if self._trust is not None:  # the same bins as the replies' full_depth_agreement
            cell = self._trust.cell(sampled.exit_layer, sampled.confidence)
            self._observer.guard_trust_result(sampled.exit_layer, cell.label, agreed)
        self.changed = True
        if self.adjuster is not None and sampled.speed_is_default:
            change = self.adjuster.observe(sampled.speed, agreed)
            if change is not None:
                self._observer.default_speed_changed(change.new_speed)

    def forget(self, row_ids: list[int], num_dropped_for_load: int = 0) -> None:
        """Shadow rows that will not finish (shed under load, or in a failed step)."""
        for row_id in row_ids:
            self._sampled.pop(row_id, None)
        if num_dropped_for_load:
            self._observer.guard_dropped(num_dropped_for_load)
        if row_ids:
            self.changed = True

    def clear(self) -> None:
        self._sampled.clear()

    def live_guard(self, num_dropped: int) -> dict[str, object]:
        """The guard's state for ``GET /v1/models``."""
        self.changed = False
        adjuster = self.adjuster
        return {
            "sample_fraction": self.guard.sample_fraction,
            "expected_agreement": dict(self.guard.expected_agreement),
            "num_dropped": num_dropped,
            "buckets": self.guard.live_curve(),
            "auto_adjust": None
            if adjuster is None
            else {
                "enabled": True,
                "target_agreement": adjuster.target_agreement,
                "calibrated_default_speed": adjuster.max_speed,
                "current_default_speed": adjuster.speed,
                "changes": [vars(c) for c in adjuster.changes],
            },
        }
