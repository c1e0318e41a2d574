"""Reading checkpoints piece by piece: local directories, sharded files, repo ids in the local HF cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from swarm import checkpoint as checkpoint_module
from swarm.checkpoint import CheckpointIndex, model_name_of, resolve_model_path
from swarm.errors import ConfigurationError
from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded") / "sharded-llama"
    make_tiny_llama(directory)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(directory)
    shutil.rmtree(directory)
    model.save_pretrained(directory, max_shard_size="20KB")
    return directory


def test_a_block_is_read_from_its_shards_only(sharded_llama, monkeypatch):
    index = CheckpointIndex(sharded_llama)
    shards = set(index.file_of.values())
    assert len(shards) > 3
    opened = []
    real_safe_open = checkpoint_module.safe_open
    monkeypatch.setattr(checkpoint_module, "safe_open", lambda path, **kw: opened.append(path) or real_safe_open(path, **kw))
    tensors = index.load_prefix("model.layers.3.")
    assert set(tensors) >= {"self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"}
    assert set(opened) == {index.file_of[f"model.layers.3.{name}"] for name in tensors}
    assert len(set(opened)) < len(shards)


def test_model_directory_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="no config.json"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigurationError, match="safetensors only"):
        CheckpointIndex(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is a file"):
        resolve_model_path(tmp_path / "file")


def test_repo_id_in_the_local_hf_cache(tiny_llama, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama, snapshot)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model_path("someone/tiny") == snapshot
    assert model_name_of("someone/tiny") == "someone/tiny"
    assert torch.equal(
        CheckpointIndex(snapshot).load_prefix("model.norm.")["weight"],
        CheckpointIndex(tiny_llama).load_prefix("model.norm.")["weight"],
    )
    with pytest.raises(ConfigurationError, match="neither a local model directory"):
        resolve_model_path("someone/not-cached")
