"""What every distributed model shares: it loads only its client-side modules, and its servers keep the cache.

`.generate()` runs in an inference session, so every step sends only the new token through the servers;
beam search makes the servers reorder their caches (`hypo_ids`).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin

from swarm.checkpoint import CheckpointIndex
from swarm.client.remote import RemoteBlocks
from swarm.client.session import InferenceSession
from swarm.spans import BlockSpan


class DistributedPreTrainedModel(PreTrainedModel, GenerationMixin):
    """What every distributed model shares: client-side modules loaded alone, and inference sessions."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True  # attention runs on the servers; this only lets the config say "sdpa"

    def __init__(self, config, family, remote: RemoteBlocks):
        super().__init__(config)
        self.family = family
        self.remote = remote
        for name, module in family.build_client_modules(config).items():
            _set_submodule(self, name, module)
        self._local = threading.local()

    @property
    def session_span(self) -> BlockSpan:
        """The blocks an inference session runs: the last stage (the decoder of an encoder-decoder)."""
        return self.family.stages(self.config)[-1]

    @classmethod
    def from_checkpoint(cls, path, config, family, remote: RemoteBlocks, dtype=torch.float32):
        """Builds the client side and loads only its tensors (embeddings, final norm, head)."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = cls(config, family, remote)
        checkpoint = CheckpointIndex(path)
        prefixes = tuple(f"{name}." for name in family.client_module_names())
        tensors = checkpoint.load(checkpoint.names(lambda name: name.startswith(prefixes)), dtype)
        model.load_state_dict(tensors, strict=False, assign=True)
        family.tie_client_weights(model, config)
        still_empty = [name for name, parameter in model.named_parameters() if parameter.is_meta]
        if still_empty:
            raise ValueError(f"the checkpoint at {path} lacks client-side tensors {still_empty}")
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model.to(dtype).eval().requires_grad_(False)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the servers keep the cache; the local side has none

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        model_kwargs.setdefault("cache", None)  # a key, so that beam search calls `_reorder_cache`

    def _reorder_cache(self, cache, beam_idx: torch.Tensor):
        """Beam search keeps the beams `beam_idx`: the servers reorder their caches before the next step."""
        if self.active_session is not None:
            self.active_session.reorder(beam_idx)
        return cache

    @property
    def active_session(self) -> InferenceSession | None:
        return getattr(self._local, "session", None)

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[InferenceSession]:
        """A session whose servers keep the KV cache; `.generate()` calls inside it continue one conversation."""
        with self.remote.inference_session(max_length, self.session_span) as session, self._use_session(session):
            yield session

    @contextlib.contextmanager
    def _use_session(self, session: InferenceSession):
        previous = self.active_session
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = previous


def _set_submodule(root: torch.nn.Module, dotted_name: str, module: torch.nn.Module):
    *parents, name = dotted_name.split(".")
    for parent in parents:
        if not hasattr(root, parent):
            root.add_module(parent, torch.nn.Module())
        root = getattr(root, parent)
    root.add_module(name, module)
