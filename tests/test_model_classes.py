"""Unit tests of the plain model classes: no Ray, no registry (models handed in as folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from deployments.bag_of_words import BagOfWords
from deployments.ensemble import Ensemble
from deployments.heads import ClassifierHead
from servecore import LABELS
from servecore.pipeline.batching import concat_batches, split_batch, text_batch
from servecore.pipeline.devices import resolve_device
from servecore.pipeline.nets import text_features


def embed(minilm, texts):
    tokenizer, encoder = minilm
    return encoder(tokenizer(text_batch(texts)))


def test_tokenizer_pads_to_the_longest_text_and_truncates(minilm):
    tokenizer, _ = minilm
    batch = tokenizer(text_batch(["hi", "my parcel has not arrived yet"]))
    assert batch["input_ids"].dtype == np.int64
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    assert batch["attention_mask"][1].all()
    long_text = " ".join(["word"] * 600)
    assert tokenizer(text_batch([long_text]))["input_ids"].shape[1] == tokenizer.max_length


def test_encoder_gives_unit_vectors_independent_of_batch_company(minilm):
    texts = ["refund please", "I was charged twice for the same order and nobody answers my emails"]
    together = embed(minilm, texts)
    alone = embed(minilm, texts[:1])
    assert together["embedding"].shape == (2, 384)
    assert together["embedding"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together["embedding"], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(alone["embedding"][0], together["embedding"][0], atol=1e-5)
    tokens = minilm[0](text_batch(texts))
    assert together["num_tokens"].tolist() == tokens["attention_mask"].sum(axis=1).tolist()


def test_encoder_accepts_ragged_token_rows_as_ray_data_may_send_them(minilm):
    tokenizer, encoder = minilm
    batch = tokenizer(text_batch(["short one", "a somewhat longer customer message here"]))
    ragged_ids = np.empty(2, dtype=object)
    ragged_mask = np.empty(2, dtype=object)
    for i in range(2):
        n = int(batch["attention_mask"][i].sum())
        ragged_ids[i] = batch["input_ids"][i, :n]
        ragged_mask[i] = batch["attention_mask"][i, :n]
    ragged = encoder({"input_ids": ragged_ids, "attention_mask": ragged_mask})
    np.testing.assert_allclose(ragged["embedding"], encoder(batch)["embedding"], atol=1e-6)


def test_encoder_embeddings_carry_meaning(minilm):
    vectors = embed(
        minilm, ["where is my parcel", "my package has still not arrived", "reset my password"]
    )["embedding"]
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1


def _write_head(folder, kind, state):
    folder.mkdir()
    config = {"kind": kind, "input_dim": 4, "hidden_dim": 8, "labels": list(LABELS)}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, str(folder / "weights.safetensors"))
    return folder


def test_linear_head_maps_embeddings_to_a_distribution(tmp_path):
    weight = torch.zeros(len(LABELS), 4)
    weight[2, 0] = 5.0  # feature 0 votes "returns"
    weight[4, 1] = 5.0  # feature 1 votes "account_access"
    folder = _write_head(
        tmp_path / "head", "linear", {"net.weight": weight, "net.bias": torch.zeros(len(LABELS))}
    )
    head = ClassifierHead(model_dir=folder, device="cpu")
    probs = head({"embedding": np.eye(4, dtype=np.float32)[:2]})["probs"]
    assert probs.shape == (2, len(LABELS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["returns", "account_access"]
    assert head.model_ref.version == "local"


def test_bag_of_words_learns_from_a_tiny_training_set(tmp_path):
    from training.bootstrap import _save_net, train_bag_of_words

    texts = [
        "charged twice on my card",
        "parcel still not delivered",
        "want to return these shoes",
        "app crashes on startup",
        "cannot log in to my account",
        "what are your opening hours",
    ]
    net, config = train_bag_of_words(texts, list(LABELS))
    model = BagOfWords(model_dir=_save_net(tmp_path / "bow", net, config))
    probs = model(text_batch(["my card was charged twice", "the app crashes"]))["probs"]
    assert [LABELS[i] for i in probs.argmax(axis=1)] == ["billing", "technical_issue"]
    empty = model(text_batch(["???"]))["probs"]  # no features at all: the bias alone answers
    np.testing.assert_allclose(empty.sum(), 1.0, atol=1e-6)


def test_text_features_are_lowercased_ngrams():
    features = text_features("Parcel LATE")
    assert features["w:parcel"] == 1 and features["b:parcel late"] == 1
    assert features["c:<pa"] == 1 and features["c:te>"] == 1


def test_ensemble_is_a_normalised_weighted_vote():
    ensemble = Ensemble({"a": 3.0, "b": 1.0})
    a = np.array([[0.9, 0.1, 0, 0, 0, 0]], dtype=np.float32)
    b = np.array([[0.0, 1.0, 0, 0, 0, 0]], dtype=np.float32)
    out = ensemble({"a.probs": a, "b.probs": b})
    np.testing.assert_allclose(out["probs"], [[0.675, 0.325, 0, 0, 0, 0]], atol=1e-6)
    assert out["label"].tolist() == ["billing"]
    with pytest.raises(KeyError, match="lacks members"):
        ensemble({"a.probs": a})
    with pytest.raises(ValueError, match="non-negative"):
        Ensemble({"a": -1.0, "b": 2.0})


def test_concat_pads_token_matrices_and_split_restores_rows():
    a = {"ids": np.array([[1, 2]]), "text": np.array(["x"], dtype=object)}
    b = {"ids": np.array([[3, 4, 5], [6, 0, 0]]), "text": np.array(["y", "z"], dtype=object)}
    merged = concat_batches([a, b])
    assert merged["ids"].tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0]]
    parts = split_batch(merged, [1, 2])
    assert parts[0]["text"].tolist() == ["x"] and parts[1]["ids"].shape == (2, 3)


def test_devices_resolve_to_cpu_without_cuda_and_refuse_explicit_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
