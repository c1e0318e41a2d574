"""The client: finding servers through the DHT, and clear errors when the swarm can't serve a model."""

from __future__ import annotations

import shutil
import time

import hivemind
import pytest
import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.errors import ConfigurationError, MissingBlocksError
from swarm.launch import start_server


def test_model_that_no_server_hosts(tiny_llama, llama_swarm_3):
    started = time.monotonic()
    with pytest.raises(MissingBlocksError, match=r"blocks \[0, 5\) of model 'nobody-serves-this'") as error:
        AutoDistributedModel.from_pretrained(
            tiny_llama, initial_peers=llama_swarm_3.initial_peers, model_name="nobody-serves-this", coverage_timeout=2
        )
    assert error.value.missing_blocks == [0, 1, 2, 3, 4]
    assert time.monotonic() - started < 15


def test_partial_coverage_names_the_missing_blocks(tiny_llama, tmp_path):
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(maddr) for maddr in dht.get_visible_maddrs()]
    server = start_server(tiny_llama, "1:3", peers)
    try:
        with pytest.raises(MissingBlocksError, match=r"blocks \[0, 1\), \[3, 5\)"):
            AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=peers, coverage_timeout=1)
    finally:
        server.stop()
        dht.shutdown()


def test_swarm_bootstraps_from_a_plain_hivemind_dht(tiny_llama, local_tiny_llama):
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    peers = [str(maddr) for maddr in dht.get_visible_maddrs()]
    servers = [start_server(tiny_llama, "0:2", peers), start_server(tiny_llama, "2:5", peers)]
    try:
        model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=peers, coverage_timeout=30)
        input_ids = torch.tensor([[3, 4, 5, 6]])
        assert torch.equal(model.generate(input_ids, max_new_tokens=6), local_tiny_llama.generate(input_ids, max_new_tokens=6))
        model.remote.shutdown()
    finally:
        for server in servers:
            server.stop()
        dht.shutdown()


def test_client_needs_initial_peers_and_a_model(tiny_llama, tmp_path):
    with pytest.raises(ConfigurationError, match="initial_peers"):
        AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=[])
    with pytest.raises(ConfigurationError, match="not a model"):
        AutoDistributedModel.from_pretrained(tmp_path, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/x"])


def test_client_loads_only_its_own_tensors(tiny_llama, llama_swarm_3):
    model = AutoDistributedModel.from_pretrained(tiny_llama, initial_peers=llama_swarm_3.initial_peers)
    try:
        names = set(model.state_dict())
        assert names == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    finally:
        model.remote.shutdown()


def test_a_client_config_serves_a_second_model_unchanged(tiny_llama, llama_swarm_3, tmp_path):
    config = ClientConfig(initial_peers=llama_swarm_3.initial_peers)
    model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config, coverage_timeout=30)
    try:
        assert model.remote.config.model_name == "tiny-llama"
        assert model.remote.config.coverage_timeout == 30
    finally:
        model.remote.shutdown()
    assert config == ClientConfig(initial_peers=llama_swarm_3.initial_peers)
    second = shutil.copytree(tiny_llama, tmp_path / "second-llama")
    with pytest.raises(MissingBlocksError, match="of model 'second-llama'"):
        AutoDistributedModel.from_pretrained(second, client_config=config, coverage_timeout=1)
