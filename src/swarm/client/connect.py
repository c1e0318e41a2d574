"""Joining a swarm for one model: its configuration and family, and the remote blocks that serve it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import hivemind

from swarm.checkpoint import load_model_config, local_model_path, model_name_of
from swarm.client.config import ClientConfig
from swarm.client.remote import RemoteBlocks
from swarm.distribution.fetch import fetch_files, split_pin
from swarm.distribution.manifest import Manifest
from swarm.distribution.torrents import TorrentSession
from swarm.errors import ConfigurationError
from swarm.models import FAMILIES, family_for
from swarm.models.base import ModelFamily
from swarm.network import start_dht, swarm_key_argument


@dataclass
class SwarmModel:
    """A model found on disk whose blocks the swarm serves."""

    path: Path  # the model's folder (a diffusers pipeline's folder, for a pipeline)
    weights_path: Path  # the folder of the served model's config and weights (the pipeline's UNet folder)
    config: object  # its configuration, as its family prepared it
    family: ModelFamily
    remote: RemoteBlocks


def connect(
    name_or_path: str | os.PathLike,
    initial_peers: list[str] | tuple[str, ...] = (),
    *,
    model_name: str | None = None,
    coverage_timeout: float | None = None,
    step_timeout: float | None = None,
    client_config: ClientConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    swarm_key: bytes | str | os.PathLike | None = None,
) -> SwarmModel:
    """Reads the model's configuration, picks its family (`UnsupportedModelError` if swarm cannot cut it), and
    waits up to `coverage_timeout` seconds for servers to cover every block (`MissingBlocksError` naming the
    blocks nobody serves). A model that is not on this disk is looked up in the swarm by name, and only its
    client-side files are fetched, into `cache_dir` (default ~/.cache/swarm/models/NAME-<hash>). The caller's
    `client_config` is copied, never changed. `swarm_key` (the key, or its file) joins a private swarm."""
    path = local_model_path(name_or_path)
    given = client_config or ClientConfig()
    overrides = {"coverage_timeout": coverage_timeout, "step_timeout": step_timeout, "swarm_key": swarm_key_argument(swarm_key)}
    client_config = dataclasses.replace(
        given,
        initial_peers=list(initial_peers or given.initial_peers),
        model_name=model_name or given.model_name or model_name_of(split_pin(str(name_or_path))[0]),
        **{name: value for name, value in overrides.items() if value is not None},
    )
    if not client_config.initial_peers:
        raise ConfigurationError("pass initial_peers: the multiaddrs of any peer of the swarm")
    if path is not None:
        config, weights_path, family = open_model(path)
    dht = start_dht(client_config.initial_peers, client_mode=True, swarm_key=client_config.swarm_key)
    try:
        if path is None:
            path = fetch_client_files(dht, str(name_or_path), client_config, cache_dir)
            config, weights_path, family = open_model(path)
        blocks = family.num_blocks(config)
        remote = RemoteBlocks(client_config, client_config.model_name, blocks, dht=dht, phases=family.phases(config))
    except BaseException:
        dht.shutdown()
        raise
    return SwarmModel(path, weights_path, config, family, remote)


def open_model(path: Path):
    """(configuration as its family prepared it, folder of its weights, family) of the model at `path`."""
    config, weights_path = load_model_config(path, FAMILIES)
    family = family_for(config)
    return family.prepare_config(config), weights_path, family


def fetch_client_files(dht: hivemind.DHT, name: str, config: ClientConfig, cache_dir: str | os.PathLike | None) -> Path:
    """Fetches the client's files of the model published as `name`: its small files and client-side tensors."""
    session = TorrentSession(config.torrent_host)
    try:
        fetched = fetch_files(dht, session, name, Manifest.client_files, cache_dir, timeout=config.fetch_timeout)
    except ConfigurationError as error:
        raise ConfigurationError(
            f"{name!r} is neither a local model directory, a repo id in the local Hugging Face cache, "
            f"nor a model published in the swarm ({error})"
        ) from None
    finally:
        session.close()
    return fetched.path
