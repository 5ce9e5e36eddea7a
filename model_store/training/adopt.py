"""``python -m model_store adopt PATH --texts FILE``: a fine-tuned Hugging Face classifier becomes an
early-exit model version, without labels.

The checkpoint (``*ForSequenceClassification`` of a supported family, labels from ``config.id2label``)
is the teacher. Its encoder and its own classification head are kept unchanged (the head is the exit
after the last layer, ``model_store.heads``), so at full depth exitserve returns the checkpoint's own
probabilities. Ramps after layers 1..L-1 are trained by self-distillation (FastBERT: KL divergence to the
checkpoint's probabilities) on the texts given, on the frozen encoder: labels are never used for
training. The texts are split 80/10/10 (by a hash of the text): train for the ramps, dev to calibrate the
speed knob as **agreement with the checkpoint** (the calibration table's "accuracy" is agreement, its
"accuracy drop" disagreement), test to report agreement and, when every text has a label, accuracy.

The maximum sequence length, unless given, is the 95th percentile of the texts' token lengths (rounded up
to a multiple of 8, at least 16), capped by the encoder's limit; the command prints it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from model_store.calibration import calibrate, pick_default
from model_store.data import Example, read_texts, stratified_split
from model_store.early_exit import DEFAULT_RAMP_HIDDEN, EarlyExitClassifier, adapter_for_config_check
from model_store.errors import UnsupportedArchitectureError
from model_store.heads import HEAD_TYPES
from model_store.manifest import Manifest, Provenance, RampSpec
from model_store.store import ModelStore
from model_store.training.features import (
    TokenizedSet,
    choose_max_seq_length,
    collect_pooled_and_final_logits,
    collect_ramp_logits,
    encoder_length_limit,
    tokenize_examples,
)
from model_store.training.loop import seed_everything
from model_store.training.pipeline import evaluate
from model_store.training.recipes import Budget, train_ramps_frozen

logger = logging.getLogger(__name__)

LENGTH_PERCENTILE = 0.95
MIN_SEQ_LENGTH = 16
POSITION_OFFSET_TYPES = frozenset(
    {"roberta", "xlm-roberta", "camembert", "mpnet"}
)  # positions start at pad+1


@dataclass(frozen=True)
class AdoptSettings:
    checkpoint: Path
    texts: Path
    store: Path
    name: str
    max_seq_length: int | None = None  # None: chosen from the texts (see the module docstring)
    text_field: str = "text"
    label_field: str = "label"
    ramp_hidden: int = DEFAULT_RAMP_HIDDEN
    budget: Budget = field(default_factory=Budget)
    seed: int = 0
    show_progress: bool = True


@dataclass
class AdoptReport:
    path: Path
    manifest: Manifest
    max_seq_length: int
    test: dict[str, Any]
    timings_s: dict[str, float]


def _relabelled(data: TokenizedSet, labels: torch.Tensor) -> TokenizedSet:
    return TokenizedSet(data.input_ids, labels, data.groups, data.pad_token_id)


def adopt(settings: AdoptSettings) -> AdoptReport:
    """Adopt the checkpoint, train and calibrate its ramps, save a new version; see the module doc."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    seed_everything(settings.seed)
    path = Path(settings.checkpoint)
    config = AutoConfig.from_pretrained(path)
    adapter_for_config_check(config)
    if config.model_type not in HEAD_TYPES:
        raise UnsupportedArchitectureError(f"adopting {config.model_type!r} checkpoints is not supported")
    if getattr(config, "problem_type", None) in ("multi_label_classification", "regression"):
        raise ValueError(f"{path}: a {config.problem_type} checkpoint; adopt takes single-label classifiers")
    num_labels = int(config.num_labels)
    if num_labels < 2:
        raise ValueError(f"{path}: {num_labels} label(s); adopt takes classifiers with at least 2 labels")
    label_names = [str(config.id2label[i]) for i in range(num_labels)]
    if len(set(label_names)) != num_labels:
        raise ValueError(f"{path}: config.id2label names are not unique: {label_names}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    classifier = AutoModelForSequenceClassification.from_pretrained(path).eval()
    model = EarlyExitClassifier.from_sequence_classifier(classifier, settings.ramp_hidden).eval()

    texts, given = read_texts(settings.texts, settings.text_field, settings.label_field)
    if given is not None:
        unknown = sorted(set(given) - set(label_names))
        if unknown:
            raise ValueError(f"{settings.texts}: labels {unknown} are not the checkpoint's {label_names}")
    limit = encoder_length_limit(config, tokenizer)
    max_len = settings.max_seq_length or choose_max_seq_length(tokenizer, texts, limit)
    if max_len > limit:
        raise ValueError(f"max sequence length {max_len} exceeds the encoder's limit {limit}")
    logger.info("max sequence length %d tokens (encoder limit %d)", max_len, limit)
    examples = [
        Example(text, label=(given[i] if given else label_names[0]), group=(given[i] if given else "text"))
        for i, text in enumerate(texts)
    ]
    train_ex, dev_ex, test_ex = stratified_split(examples, seed=settings.seed)
    if not dev_ex or not test_ex:
        raise ValueError(f"{settings.texts}: too few texts ({len(texts)}) for train/dev/test splits")
    train, dev, test = (
        tokenize_examples(tokenizer, s, label_names, max_len) for s in (train_ex, dev_ex, test_ex)
    )
    timings["load"] = time.perf_counter() - started

    t = time.perf_counter()
    budget = settings.budget
    with tqdm(
        total=len(train), desc="checkpoint features", unit="row", disable=not settings.show_progress
    ) as bar:
        features, teacher_logits = collect_pooled_and_final_logits(
            model, train, budget.inference_batch_size, progress=bar
        )
    stats = train_ramps_frozen(
        model, train, budget, settings.seed, settings.show_progress, targets="teacher",
        desc="ramps (self-distillation)", features=features, teacher_logits=teacher_logits,
    )  # fmt: skip
    timings["ramps"] = time.perf_counter() - t

    t = time.perf_counter()
    with tqdm(total=len(dev), desc="calibrate (dev)", unit="row", disable=not settings.show_progress) as bar:
        dev_logits = collect_ramp_logits(model, dev, budget.inference_batch_size, progress=bar)
    table = calibrate(
        dev_logits, dev_logits[:, -1].argmax(dim=-1), split="dev, agreement with the checkpoint"
    )
    chosen = pick_default(table)
    test_logits = collect_ramp_logits(model, test, budget.inference_batch_size)
    default = (chosen.criterion, chosen.speed)
    agreement = evaluate(test_logits, _relabelled(test, test_logits[:, -1].argmax(dim=-1)), default)
    accuracy = evaluate(test_logits, test, default) if given is not None else None
    timings["calibrate"] = time.perf_counter() - t

    store = ModelStore(settings.store)
    manifest = Manifest(
        name=settings.name,
        version=store.next_version(settings.name),
        architecture=str(config.model_type),
        num_layers=model.num_layers,
        hidden_size=int(config.hidden_size),
        labels=label_names,
        max_seq_length=max_len,
        ramp=RampSpec(hidden_size=settings.ramp_hidden, final="checkpoint_head"),
        default_criterion=chosen.criterion,
        default_speed=chosen.speed,
        calibration=table,
        provenance=Provenance.model_validate(
            {
                "recipe": "adopt",
                "base_model": str(path),
                "data": str(settings.texts),
                "seed": settings.seed,
                "labels_given": given is not None,
                "split_sizes": {"train": len(train), "dev": len(dev), "test": len(test)},
                "stages": {"ramps (self-distillation)": dataclasses.asdict(stats)},
                "agreement_evaluation": agreement,
                # `model_store report` reads this: accuracy on labels when given, else agreement.
                "test_evaluation": accuracy if accuracy is not None else agreement,
            }
        ),
    )
    saved_path = store.save(model, tokenizer, manifest)
    timings["total"] = time.perf_counter() - started
    test_eval = accuracy if accuracy is not None else agreement
    return AdoptReport(saved_path, manifest.model_copy(update={"files": {}}), max_len, test_eval, timings)


def format_adopt_report(report: AdoptReport) -> str:
    """What ``adopt`` prints: where it saved, the length chosen, and the test split's figures."""
    test = report.test
    kind = "accuracy" if getattr(report.manifest.provenance, "labels_given", False) else "agreement"
    chosen = next(p for p in test["points"] if p["is_default"])
    m = report.manifest
    return "\n".join(
        [
            f"adopted {m.provenance.base_model} as {m.name} version {m.version}: {report.path}",
            f"max sequence length {report.max_seq_length} tokens; ramps trained without labels",
            f"test split ({test['num_examples']} texts), {kind} with "
            + ("the labels:" if kind == "accuracy" else "the checkpoint:"),
            f"  full depth {100 * test['per_layer'][-1]['all']:.2f} %",
            f"  default {chosen['criterion']} at speed {chosen['speed']:g}: "
            f"{100 * chosen['accuracy']['all']:.2f} % at {chosen['mean_exit_layer']:.2f} mean layers",
            f"  (dev calibration: {m.calibration.split if m.calibration else 'none'})",
            f"took {report.timings_s['total']:.0f} s",
        ]
    )
