"""Joining a swarm for one model: its configuration and family, and the remote blocks that serve it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path


from swarm.checkpoint import load_model_config, model_name_of, resolve_model_path
from swarm.client.config import ClientConfig
from swarm.client.remote import RemoteBlocks
from swarm.errors import ConfigurationError
from swarm.models import FAMILIES, family_for
from swarm.models.base import ModelFamily


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
) -> SwarmModel:
    """Reads the model's configuration, picks its family (`UnsupportedModelError` if swarm cannot cut it), and
    waits up to `coverage_timeout` seconds for servers to cover every block (`MissingBlocksError` naming the
    blocks nobody serves). The caller's `client_config` is copied, never changed."""
    path = resolve_model_path(name_or_path)
    config, weights_path = load_model_config(path, FAMILIES)
    family = family_for(config)
    config = family.prepare_config(config)
    given = client_config or ClientConfig()
    overrides = {"coverage_timeout": coverage_timeout, "step_timeout": step_timeout}
    client_config = dataclasses.replace(
        given,
        initial_peers=list(initial_peers or given.initial_peers),
        model_name=model_name or given.model_name or model_name_of(name_or_path),
        **{name: value for name, value in overrides.items() if value is not None},
    )
    if not client_config.initial_peers:
        raise ConfigurationError("pass initial_peers: the multiaddrs of any peer of the swarm")
    remote = RemoteBlocks(client_config, client_config.model_name, family.num_blocks(config), phases=family.phases(config))
    return SwarmModel(path, weights_path, config, family, remote)
