"""`AutoDistributedModel.from_pretrained(...)`: the right distributed class for a checkpoint's family."""

from __future__ import annotations

import dataclasses
import os

import torch

from swarm.checkpoint import load_model_config, model_name_of, resolve_model_path
from swarm.client.config import ClientConfig
from swarm.client.remote import RemoteBlocks
from swarm.errors import ConfigurationError


class AutoDistributedModel:
    """Builds the client side of a model whose blocks run in a swarm."""

    @staticmethod
    def from_pretrained(
        name_or_path: str | os.PathLike,
        initial_peers: list[str] | tuple[str, ...] = (),
        *,
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        coverage_timeout: float | None = None,
        step_timeout: float | None = None,
        client_config: ClientConfig | None = None,
    ):
        """Loads only the client-side weights of `name_or_path` and finds servers for its blocks.

        For a diffusers pipeline folder, returns the pipeline with its UNet in the swarm (its other
        components run here). Waits up to `coverage_timeout` seconds for the swarm to cover every block,
        then raises `MissingBlocksError` naming the blocks that no server hosts.
        """
        from swarm.models import FAMILIES, family_for

        path = resolve_model_path(name_or_path)
        config, _ = load_model_config(path, FAMILIES)
        family = family_for(config)
        config = family.prepare_config(config)
        given = client_config or ClientConfig()
        overrides = {"coverage_timeout": coverage_timeout, "step_timeout": step_timeout}
        client_config = dataclasses.replace(  # a copy: the caller's config stays as it was, ready for another model
            given,
            initial_peers=list(initial_peers or given.initial_peers),
            model_name=model_name or given.model_name or model_name_of(name_or_path),
            **{name: value for name, value in overrides.items() if value is not None},
        )
        if not client_config.initial_peers:
            raise ConfigurationError("pass initial_peers: the multiaddrs of any peer of the swarm")
        remote = RemoteBlocks(
            client_config, client_config.model_name, family.num_blocks(config), phases=family.phases(config)
        )
        try:
            return family.client_model(path, config, remote, dtype)
        except BaseException:
            remote.shutdown()
            raise
