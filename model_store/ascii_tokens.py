"""ASCII texts through a BERT WordPiece tokenizer without the library's per-call bookkeeping, with its ids.

Why: the Rust ``tokenizers`` library spends most of a short call on bookkeeping around the work itself
(the normalized string's alignment maps, the pre-tokenized splits, the conversions into Python): on the
2-core development VM 65-80 us for a 150-character text and ~300 us for the 768-character prefix of an
email, the largest single cost of a request in a front end. For ASCII text, BERT's normalizer and
pre-tokenizer act on each character alone (clean-up, lowercasing; a space splits, a punctuation mark
stands alone), so a translation table and one regular expression do their work at C speed, and a word's
WordPiece ids can be looked up once and kept: 7.6 us for the 150 characters, 66 us for a 2,000-character
email (measured side by side, same VM).

How it stays exact: nothing of the tokenizer is written here by hand. At construction the character table
(what the normalizer makes of each ASCII character) and the split classes (what the pre-tokenizer does
with each character the normalizer can produce) are read off the tokenizer itself, one probe per
character; a word's pieces come from the Rust tokenizer (one call per word not seen before, then cached);
the special tokens around a text come from encoding a probe. Then a probe set (every ASCII character,
truncation, over-long words) is compared with the library's own answers, and any difference turns the
fast path off for this tokenizer. ``tests/model_store/test_ascii_tokens.py`` compares the two on every
ASCII email of the SpamAssassin corpus and on random ASCII strings.

It applies to tokenizers made of ``BertNormalizer``, ``BertPreTokenizer`` and ``WordPiece`` (the BERT
family's ``tokenizer.json``: MiniLM, BERT, DistilBERT, ELECTRA) and to single texts that are pure ASCII;
every other tokenizer, a text with any other character and text pairs go through the library.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Each probe brackets one character between two letters, so a character the normalizer drops or the
# pre-tokenizer splits on shows as a change next to them.
_LEFT, _RIGHT = "a", "b"
# The word cache is cleared when it reaches this many words (a front end serving random strings, spam's
# hashes and ids, must not grow without bound): ~100 bytes a word.
MAX_CACHED_WORDS = 1 << 16
# Words this long or longer are not cached (WordPiece maps words over its 100-character limit to [UNK];
# long ones are rare and mostly unique).
MAX_CACHED_WORD_CHARS = 48

Fallback = Callable[[str], tuple[tuple[int, ...], bool]]


class AsciiWordPiece:
    """Token ids (special tokens included) of an ASCII text and whether it was truncated, as the Rust
    tokenizer configured for ``max_seq_length`` gives them. Build with ``for_tokenizer`` (None when the
    tokenizer is not of the BERT kind, or its probes disagree with the library)."""

    def __init__(
        self,
        table: dict[int, str],
        word_chars: frozenset[str],
        words: re.Pattern[str],
        head: list[int],
        tail: list[int],
        word_pieces: Callable[[str], list[int]],
        max_seq_length: int,
        prefix_chars: int,
        cut_chars: int,
    ) -> None:
        self._table = table
        self._word_chars = word_chars
        self._findall = words.findall
        self._head, self._tail = head, tail
        self._word_pieces = word_pieces
        self._max_seq_length = max_seq_length
        self._room = max_seq_length - len(head) - len(tail)  # content tokens that fit
        self._prefix_chars = prefix_chars
        self._cut_chars = cut_chars
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(
        cls, backend: Tokenizer, max_seq_length: int, prefix_chars: int, cut_chars: int, reference: Fallback
    ) -> AsciiWordPiece | None:
        """The fast path for ``backend`` (configured without truncation here), or None where it does not
        apply. ``reference``: the library's own single-text answer, which the probes must equal;
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
        learned = _learn_characters(words_only)
        if learned is None:
            return None
        table, word_chars, punctuation = learned
        with_specials = words_only.encode(_LEFT).ids
        plain = words_only.encode(_LEFT, add_special_tokens=False).ids
        at = _find(with_specials, plain)
        if at < 0:
            return None
        head, tail = with_specials[:at], with_specials[at + len(plain) :]
        if max_seq_length - len(head) - len(tail) < 1:
            return None
        pattern = "|".join(
            p for p in (_char_class(word_chars) + "+" if word_chars else "", _char_class(punctuation)) if p
        )

        def word_pieces(word: str) -> list[int]:
            return list(words_only.encode(word, add_special_tokens=False).ids)

        fast = cls(
            table, frozenset(word_chars), re.compile(pattern), head, tail, word_pieces, max_seq_length,
            prefix_chars, cut_chars,
        )  # fmt: skip
        for text in _probes(max_seq_length, prefix_chars):
            if fast(text) != reference(text):
                logger.warning("the ASCII tokenizer fast path disagrees with the tokenizer on a probe: off")
                return None
        fast._cache.clear()
        return fast

    def __call__(self, text: str) -> tuple[tuple[int, ...], bool]:
        """``text`` must be ASCII (``str.isascii``)."""
        if len(text) > self._prefix_chars:
            # A long text: its first characters usually hold more tokens than fit. The last word of the
            # prefix may go on past it, so it is not counted; if what is left overflows, those are the
            # whole text's first tokens (words never span a space or a punctuation mark).
            normalized = text[: self._prefix_chars].translate(self._table)
            words = self._findall(normalized)
            if words and normalized[-1] in self._word_chars:
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
                pieces = self._word_pieces(word)
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


def _learn_characters(backend: Tokenizer) -> tuple[dict[int, str], str, str] | None:
    """What the normalizer makes of each ASCII character (a ``str.translate`` table), and which of the
    characters it produces the pre-tokenizer keeps in words and which it isolates (punctuation); None if
    a character does anything else (a multi-character rule, a split of another kind)."""
    normalizer, pre_tokenizer = backend.normalizer, backend.pre_tokenizer
    assert normalizer is not None and pre_tokenizer is not None
    table: dict[int, str] = {}
    produced: set[str] = set()
    for code in range(128):
        char = chr(code)
        out = normalizer.normalize_str(_LEFT + char + _RIGHT)
        if not (out.startswith(_LEFT) and out.endswith(_RIGHT)) or len(out) > 3:
            return None
        mid = out[1:-1]
        if mid != char:
            table[code] = mid
        if mid:
            produced.add(mid)
    word_chars, punctuation = [], []
    for char in sorted(produced):
        pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str(_LEFT + char + _RIGHT)]
        if pieces == [_LEFT + char + _RIGHT]:
            word_chars.append(char)
        elif pieces == [_LEFT, char, _RIGHT]:
            punctuation.append(char)
        elif pieces != [_LEFT, _RIGHT]:  # a space: it splits and is dropped
            return None
    return table, "".join(word_chars), "".join(punctuation)


def _char_class(chars: str) -> str:
    return "[" + "".join(re.escape(c) for c in chars) + "]"


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
        "x" * 120 + " antidisestablishmentarianism " + "y" * 99,
        "word " * (max_seq_length + 8),
        "a" * (prefix_chars + 3) + " tail",
        "A\x00B\x7fC\tD\x0bE\rF\x1fG" * 20,
        ("The quick brown fox jumps over the lazy dog. " * (prefix_chars // 40 + 2))[: prefix_chars + 1]
        + "zz",
    ]
