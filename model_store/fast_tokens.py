"""Texts through a BERT WordPiece tokenizer without the library's per-call bookkeeping, with its ids.

Why: the Rust ``tokenizers`` library spends most of a short call on bookkeeping around the work itself
(the normalized string's alignment maps, the pre-tokenized splits, the conversions into Python): on the
2-core development VM 65-80 us for a 150-character text and ~300 us for the 768-character prefix of an
email, the largest single cost of a request in a front end. BERT's normalizer and pre-tokenizer act on
each character alone (clean-up, lowercasing, accents stripped, spaces around CJK characters; a space
splits, a punctuation mark stands alone), so one ``str.translate`` and one regular expression do their
work at C speed, and a word's WordPiece ids can be looked up once and kept: 7.6 us for the 150
characters, 66 us for a 2,000-character email (measured side by side, same VM).

How it stays exact: nothing of the tokenizer is written here by hand. What the normalizer makes of a
character, and what the pre-tokenizer does with each character that produces (keep it in a word, split
on it, or isolate it as punctuation), is read off the tokenizer itself, one probe per character: every
ASCII character at construction, any other the first time a text holds it. A word's pieces come from the
Rust tokenizer (one call per word not seen before, then cached), except a word that is itself in the
vocabulary: that is its one token (WordPiece's first match is the whole word). The special tokens around
a text come from encoding a probe. Then a probe set (every ASCII character, accents, CJK, truncation,
over-long words) is compared with the library's own answers, and any difference turns the fast path off
for this tokenizer. A character the probes cannot pin down (its output is not framed by the probe's
neighbours, is a combining mark canonical reordering could move, or splits in some other way) sends every
text that holds it to the library. ``tests/model_store/test_fast_tokens.py`` compares the two on every
email of the SpamAssassin corpus and on random texts across scripts, controls, marks and spaces.

It applies to tokenizers made of ``BertNormalizer``, ``BertPreTokenizer`` and ``WordPiece`` (the BERT
family's ``tokenizer.json``: MiniLM, BERT, DistilBERT, ELECTRA) and to single texts; every other
tokenizer and text pairs go through the library.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Each probe brackets one character between two letters, so a character the normalizer drops or the
# pre-tokenizer splits on shows as a change next to them.
_LEFT, _RIGHT = "a", "b"
_SPACE = " "
# The word cache is cleared when it reaches this many words (a front end serving random strings, spam's
# hashes and ids, must not grow without bound): ~100 bytes a word.
MAX_CACHED_WORDS = 1 << 16
# Words this long or longer are not cached (WordPiece maps words over its 100-character limit to [UNK];
# long ones are rare and mostly unique).
MAX_CACHED_WORD_CHARS = 48
# Characters learned at most (each ~100 bytes over the table and sets): past this, a text with a character
# not yet learned goes to the library, so random Unicode cannot grow a front end without bound.
MAX_LEARNED_CHARS = 1 << 15
_ASCII = frozenset(chr(c) for c in range(128))

Reference = Callable[[str], tuple[tuple[int, ...], bool]]


class FastWordPiece:
    """Token ids (special tokens included) of a text and whether it was truncated, as the Rust tokenizer
    configured for ``max_seq_length`` gives them; None for a text it leaves to the library. Build with
    ``for_tokenizer`` (None when the tokenizer is not of the BERT kind, or its probes disagree).
    Safe to call from several threads: learning a new character takes a lock, reading never does."""

    def __init__(
        self,
        words_only: Tokenizer,
        head: list[int],
        tail: list[int],
        max_seq_length: int,
        prefix_chars: int,
        cut_chars: int,
    ) -> None:
        normalizer, pre_tokenizer = words_only.normalizer, words_only.pre_tokenizer
        assert normalizer is not None and pre_tokenizer is not None
        self._normalize = normalizer.normalize_str
        self._pre_tokenize = pre_tokenizer.pre_tokenize_str
        self._encode_word = words_only.encode
        self._head, self._tail = head, tail
        self._max_seq_length = max_seq_length
        self._room = max_seq_length - len(head) - len(tail)  # content tokens that fit
        self._prefix_chars = prefix_chars
        self._cut_chars = cut_chars
        self._cache: dict[str, list[int]] = {}
        # A word that is itself in the vocabulary is that one token (WordPiece's first match is the whole
        # word): no library call for it even the first time. Words never hold punctuation, so the
        # vocabulary's "##" pieces and special tokens can never be looked up here.
        model = words_only.model
        max_chars = int(getattr(model, "max_input_chars_per_word", 0))
        self._whole_words = {w: [i] for w, i in words_only.get_vocab().items() if len(w) <= max_chars}
        # What the normalizer makes of each character seen (absent: itself), with every character the
        # pre-tokenizer splits on made a plain space; ``_known`` is updated last, so a reader that finds
        # a character there finds its table entry and the split pattern that covers it.
        self._table: dict[int, str] = {}
        self._known: set[str] = set()
        self._refused: set[str] = set()
        self._punctuation: set[str] = set()
        self._classes: dict[str, str] = {}  # a character the normalizer produces -> word/space/punct
        self._learning = threading.Lock()
        self._findall = re.compile(r"[^ ]+").findall
        self._learn(_ASCII)
        self._ascii_known = self._known >= _ASCII

    @classmethod
    def for_tokenizer(
        cls, backend: Tokenizer, max_seq_length: int, prefix_chars: int, cut_chars: int, reference: Reference
    ) -> FastWordPiece | None:
        """The fast path for ``backend`` (copied, without truncation), or None where it does not apply.
        ``reference``: the library's own single-text answer, which the probes must equal;
        ``prefix_chars``: the characters tried first for a long text; ``cut_chars``: where a text is cut
        before tokenizing at all (``tokens.cut_text``)."""
        kinds = (
            type(backend.normalizer).__name__,
            type(backend.pre_tokenizer).__name__,
            type(backend.model).__name__,
        )
        if kinds != ("BertNormalizer", "BertPreTokenizer", "WordPiece"):
            return None
        words_only = Tokenizer.from_str(backend.to_str())
        words_only.no_truncation()
        words_only.no_padding()
        with_specials = words_only.encode(_LEFT).ids
        plain = words_only.encode(_LEFT, add_special_tokens=False).ids
        at = _find(with_specials, plain)
        if at < 0:
            return None
        head, tail = with_specials[:at], with_specials[at + len(plain) :]
        if max_seq_length - len(head) - len(tail) < 1:
            return None
        fast = cls(words_only, head, tail, max_seq_length, prefix_chars, cut_chars)
        for text in _probes(max_seq_length, prefix_chars):
            if fast(text) not in (None, reference(text)):
                logger.warning("the tokenizer fast path disagrees with the tokenizer on a probe: off")
                return None
        fast._cache.clear()
        return fast

    def __call__(self, text: str) -> tuple[tuple[int, ...], bool] | None:
        if not (self._ascii_known and text.isascii()):
            chars = set(text[: self._cut_chars])
            if not chars <= self._known:
                new = chars - self._known
                if new & self._refused or len(self._known) + len(new) > MAX_LEARNED_CHARS:
                    return None
                if not self._learn(new):
                    return None
        if len(text) > self._prefix_chars:
            # A long text: its first characters usually hold more tokens than fit. The last word of the
            # prefix may go on past it, so it is not counted; if what is left overflows, those are the
            # whole text's first tokens (words never span a space or a punctuation mark).
            normalized = text[: self._prefix_chars].translate(self._table)
            words = self._findall(normalized)
            if words and self._classes.get(normalized[-1]) == "word":
                words.pop()
            ids = self._pieces(words)
            if len(ids) > self._room:
                return self._wrap(ids), True
            short = text[: self._cut_chars]
            ids = self._pieces(self._findall(short.translate(self._table)))
            wrapped = self._wrap(ids)
            # As the library path reports it: a text cut by characters that fills the model is truncated.
            return wrapped, len(ids) > self._room or (
                len(short) < len(text) and len(wrapped) >= self._max_seq_length
            )
        ids = self._pieces(self._findall(text.translate(self._table)))
        return self._wrap(ids), len(ids) > self._room

    def _pieces(self, words: list[str]) -> list[int]:
        """The words' WordPiece ids, stopping once more than fit."""
        ids: list[int] = []
        cache = self._cache
        room = self._room
        for word in words:
            pieces = cache.get(word)
            if pieces is None:
                pieces = self._whole_words.get(word)
            if pieces is None:
                pieces = list(self._encode_word(word, add_special_tokens=False).ids)
                if len(word) < MAX_CACHED_WORD_CHARS:
                    if len(cache) >= MAX_CACHED_WORDS:
                        cache.clear()
                    cache[word] = pieces
            ids += pieces
            if len(ids) > room:
                break
        return ids

    def _wrap(self, ids: list[int]) -> tuple[int, ...]:
        return (*self._head, *ids[: self._room], *self._tail)

    def _learn(self, chars: Iterable[str]) -> bool:
        """Probe ``chars``; False if any of them is refused (its texts go to the library)."""
        with self._learning:
            ok = True
            grew_punctuation = False
            learned: list[str] = []
            for char in chars:
                if char in self._known:
                    continue
                if char in self._refused:
                    ok = False
                    continue
                out = self._normalize(_LEFT + char + _RIGHT)
                produced = out[1:-1] if out[:1] == _LEFT and out[-1:] == _RIGHT else None
                classes = [self._class_of(c) for c in produced] if produced is not None else ["refused"]
                if "refused" in classes:
                    self._refused.add(char)
                    ok = False
                    continue
                assert produced is not None
                for c, kind in zip(produced, classes, strict=True):
                    if kind == "punct" and c not in self._punctuation:
                        self._punctuation.add(c)
                        grew_punctuation = True
                mapped = "".join(
                    _SPACE if k == "space" else c for c, k in zip(produced, classes, strict=True)
                )
                if mapped != char:
                    self._table[ord(char)] = mapped
                learned.append(char)
            if grew_punctuation:
                marks = "".join(re.escape(c) for c in sorted(self._punctuation))
                self._findall = re.compile(f"[^ {marks}]+|[{marks}]").findall
            self._known.update(learned)  # last: see ``_known``
            return ok

    def _class_of(self, char: str) -> str:
        """What the pre-tokenizer does with ``char`` (one the normalizer produced): "word" (kept in a
        word), "space" (split on and dropped), "punct" (a word of its own) or "refused"."""
        kind = self._classes.get(char)
        if kind is not None:
            return kind
        pieces = [piece for piece, _ in self._pre_tokenize(_LEFT + char + _RIGHT)]
        if unicodedata.combining(char):  # canonical reordering could move it: not one character's doing
            kind = "refused"
        elif pieces == [_LEFT + char + _RIGHT]:
            kind = "word" if char != _SPACE else "refused"
        elif pieces == [_LEFT, char, _RIGHT]:
            kind = "punct"
        elif pieces == [_LEFT, _RIGHT]:
            kind = "space"
        else:
            kind = "refused"
        self._classes[char] = kind
        return kind


def _find(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return -1


def _probes(max_seq_length: int, prefix_chars: int) -> list[str]:
    every = "".join(chr(c) for c in range(128))
    return [
        "",
        " ",
        every,
        every[::-1] * 3,
        "Hello, World. It's 9:30am -- e-mail me@example.com!",
        "Café Ünïcödé — “quoted” naïve 東京タワー 🎉 ﬁne\u00a0space\u200djoin",
        "x" * 120 + " antidisestablishmentarianism " + "y" * 99,
        "word " * (max_seq_length + 8),
        "a" * (prefix_chars + 3) + " tail",
        "A\x00B\x7fC\tD\x0bE\rF\x1fG" * 20,
        ("The quick brown fox jumps over the lazy dog. " * (prefix_chars // 40 + 2))[: prefix_chars + 1]
        + "zz",
    ]
