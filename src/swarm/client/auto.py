"""`AutoDistributedModel.from_pretrained(...)`: the right distributed class for a checkpoint's family."""

from __future__ import annotations

import os

import torch

from swarm.client.causal_lm import DistributedModelForCausalLM
from swarm.client.config import ClientConfig
from swarm.client.connect import connect
from swarm.client.diffusion import DistributedUNet2DConditionModel
from swarm.client.encoder import DistributedEncoderModel
from swarm.client.seq2seq_lm import DistributedModelForSeq2SeqLM
from swarm.client.text_to_speech import DistributedModelForTextToSpeech
from swarm.pipelines import register_text2text_generation

# `ModelFamily.client_kind` -> the class that drives the model on the client (its `from_swarm` builds it)
CLIENT_KINDS = {
    "causal_lm": DistributedModelForCausalLM,
    "seq2seq_lm": DistributedModelForSeq2SeqLM,
    "diffusion_unet": DistributedUNet2DConditionModel,
    "encoder": DistributedEncoderModel,
    "text_to_speech": DistributedModelForTextToSpeech,
}

register_text2text_generation()  # transformers 5 removed the task that seq2seq models (T5) answer in


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
        cache_dir: str | os.PathLike | None = None,
        swarm_key: bytes | str | os.PathLike | None = None,
    ):
        """Loads only the client-side weights of `name_or_path` and finds servers for its blocks.

        Returns the model's own class (a causal or sequence-to-sequence LM, an encoder, a text-to-speech model) with its blocks in the swarm; for a
        diffusers pipeline folder, the pipeline with its UNet in the swarm (its other components run here).
        Waits up to `coverage_timeout` seconds for the swarm to cover every block, then raises
        `MissingBlocksError` naming the blocks that no server hosts; a model swarm cannot cut raises
        `UnsupportedModelError`. A `name_or_path` that is neither on this disk nor in the local Hugging Face
        cache names a model published in the swarm: only its client-side files are fetched, into `cache_dir`.
        `swarm_key` (the key's bytes, or the path of its file) joins a private swarm.
        """
        model = connect(
            name_or_path,
            initial_peers,
            model_name=model_name,
            coverage_timeout=coverage_timeout,
            step_timeout=step_timeout,
            client_config=client_config,
            cache_dir=cache_dir,
            swarm_key=swarm_key,
        )
        try:
            client_class = CLIENT_KINDS[model.family.client_kind]
            return client_class.from_swarm(model.path, model.weights_path, model.config, model.family, model.remote, dtype)
        except BaseException:
            model.remote.shutdown()
            raise
