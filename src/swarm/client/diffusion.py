"""Stable Diffusion with its UNet in the swarm; the text encoder, VAE and scheduler run here, as diffusers' own.

    pipe = AutoDistributedModel.from_pretrained("path/to/sd", initial_peers=[...])  # a StableDiffusionPipeline
    image = pipe("a red fox", num_inference_steps=30, generator=torch.Generator().manual_seed(0)).images[0]

`DistributedUNet2DConditionModel` takes the arguments of `UNet2DConditionModel.forward` and returns its
output, so it drops into any diffusers pipeline that takes a `unet`:

    unet = DistributedUNet2DConditionModel.from_pretrained("path/to/sd", initial_peers=[...])
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=..., tokenizer=..., unet=unet, scheduler=...)
    with unet.inference_session():  # optional: one session for every step of the call
        image = pipe("a red fox", image=start).images[0]

A UNet call is one step of an inference session: the embeddings run here, then the sample goes down the
route and back up (see `swarm.models.unet`). Servers keep the prompt embeddings for their session, so
they travel with its first step only (and again if they change). Pipelines from `from_pretrained` run each
call in one session; a bare UNet call outside a session opens one for itself. A server lost between two
steps costs a retry: its replacement receives the session's conditioning again and the step goes on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from swarm.checkpoint import PIPELINE_FILE, model_name_of
from swarm.client.base import load_client_model
from swarm.client.connect import connect
from swarm.client.remote import RemoteBlocks
from swarm.client.session import InferenceSession
from swarm.errors import ConfigurationError

CONDITIONING = ("encoder_hidden_states", "attention_mask", "encoder_attention_mask")  # kept by server sessions


@dataclass
class _ActiveSession:
    session: InferenceSession
    conditioning: dict[str, torch.Tensor | None] | None = None  # as the servers hold it; None: not sent yet


class DistributedUNet2DConditionModel(UNet2DConditionModel):
    """A `UNet2DConditionModel` whose blocks run in a swarm while its embeddings run here. It has the config
    and embedding modules of the local UNet (and its helper methods); its blocks are on the servers."""

    def attach_swarm(self, family, remote: RemoteBlocks):
        self.family = family
        self.remote = remote
        self.pipeline_path: Path | None = None  # the pipeline folder this UNet was loaded from, if any
        self._local = threading.local()

    @classmethod
    def from_swarm(cls, path: Path, weights_path: Path, config, family, remote: RemoteBlocks, dtype=torch.float32):
        """The client side of the UNet at `path` (only its embeddings load): the diffusers pipeline with it in
        place of its UNet when `path` is a pipeline's folder, else the UNet alone."""
        model = load_client_model(weights_path, config, family, remote, dtype, cls)
        if not (path / PIPELINE_FILE).is_file():
            return model
        model.pipeline_path = path
        return distributed_pipeline(path, model, dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, initial_peers=(), **kwargs) -> "DistributedUNet2DConditionModel":
        """The UNet of a pipeline folder (or the UNet's own folder) with its blocks in the swarm; takes the
        keyword arguments of `AutoDistributedModel.from_pretrained`."""
        dtype = kwargs.pop("dtype", torch.float32)
        kwargs["model_name"] = kwargs.get("model_name") or model_name_of(name_or_path)
        model = connect(name_or_path, initial_peers, **kwargs)
        try:
            if model.family.client_kind != "diffusion_unet":
                raise ConfigurationError(f"{name_or_path} holds a {model.config.model_type} model, not a UNet2DConditionModel")
            return cls.from_swarm(model.weights_path, model.weights_path, model.config, model.family, model.remote, dtype)
        except BaseException:
            model.remote.shutdown()
            raise

    # Sessions

    @property
    def active_session(self) -> InferenceSession | None:
        active = getattr(self._local, "active", None)
        return active.session if active is not None else None

    @contextlib.contextmanager
    def inference_session(self) -> Iterator[InferenceSession]:
        """One session for every UNet call inside it (the steps of a pipeline call): the servers keep the
        prompt embeddings between steps, and failover replays only what they depend on."""
        previous = getattr(self._local, "active", None)
        with InferenceSession(self.remote, max_length=1, span=self.remote.span) as session:
            self._local.active = _ActiveSession(session)
            try:
                yield session
            finally:
                self._local.active = previous

    # The forward pass

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DConditionOutput | tuple:
        """`UNet2DConditionModel.forward`: (B, C, H, W) noisy latents -> (B, C_out, H, W) prediction."""
        if cross_attention_kwargs:
            raise NotImplementedError("cross_attention_kwargs (LoRA scales, attention processors) need the servers")
        if any(residuals is not None for residuals in (
            down_block_additional_residuals, mid_block_additional_residual, down_intrablock_additional_residuals
        )):  # fmt: skip
            raise NotImplementedError("ControlNet and T2I-Adapter residuals are not supported by the swarm's UNet")
        masks = [_bias(mask, sample.dtype) for mask in (attention_mask, encoder_attention_mask)]
        inputs, encoder_hidden_states = self._embed(
            sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs or {}
        )
        conditioning = dict(zip(CONDITIONING, (encoder_hidden_states, *masks)))
        active = getattr(self._local, "active", None)
        if active is None:
            with InferenceSession(self.remote, max_length=1, span=self.remote.span) as session:
                output = session.step({**inputs, **conditioning}, keeps_state=False)["sample"]
        else:
            changed = active.conditioning is None or not _same_tensors(active.conditioning, conditioning)
            step_inputs = {**inputs, **conditioning} if changed else inputs
            output = active.session.step(step_inputs, keeps_state=changed, resets_state=changed)["sample"]
            if changed:  # a copy, in case the caller changes its tensors in place
                active.conditioning = {name: _copy(tensor) for name, tensor in conditioning.items()}
        output = output.to(sample.device)
        return UNet2DConditionOutput(sample=output) if return_dict else (output,)

    def _embed(self, sample, timestep, encoder_hidden_states, class_labels, timestep_cond, added_cond_kwargs):
        """What `UNet2DConditionModel.forward` does before `conv_in`, which runs here: centering the sample, the
        time embedding (with class and addition embeddings) and the encoder projection. Returns the step's
        tensors {sample (B, C, H, W), emb (B, T)} and the encoder hidden states the blocks attend to."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = self.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if self.config.class_embeddings_concat else emb + class_emb
        aug_emb = self.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        if self.config.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
            sample = torch.cat([sample, hint], dim=1)
        emb = emb + aug_emb if aug_emb is not None else emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if encoder_hidden_states is not None:
            encoder_hidden_states = self.process_encoder_hidden_states(
                encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
            )
        if isinstance(encoder_hidden_states, tuple):
            raise NotImplementedError("IP-Adapter image projections are not supported by the swarm's UNet")
        return {"sample": sample, "emb": emb}, encoder_hidden_states


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A (B, S) keep-mask as the (B, 1, S) additive bias that diffusers' attention takes."""
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1) if mask is not None else None


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return tensor.detach().clone() if tensor is not None else None


def _same_tensors(held: dict[str, torch.Tensor | None], new: dict[str, torch.Tensor | None]) -> bool:
    return all(
        (held[name] is None and new[name] is None)
        or (
            held[name] is not None
            and new[name] is not None
            and held[name].shape == new[name].shape
            and held[name].dtype == new[name].dtype
            and torch.equal(held[name].cpu(), new[name].cpu())
        )
        for name in held
    )


class SessionPerCall:
    """Runs each call of a diffusers pipeline in one inference session of its distributed UNet."""

    def __call__(self, *args, **kwargs):
        if self.unet.active_session is not None:
            return super().__call__(*args, **kwargs)
        with self.unet.inference_session():
            return super().__call__(*args, **kwargs)


@functools.cache
def _session_per_call(pipeline_class: type) -> type:
    """`pipeline_class` whose calls each run in one session; it keeps the name diffusers saves it under."""
    return type(pipeline_class.__name__, (SessionPerCall, pipeline_class), {"__doc__": pipeline_class.__doc__})


def distributed_pipeline(path: Path, unet: DistributedUNet2DConditionModel, dtype: torch.dtype) -> DiffusionPipeline:
    """The diffusers pipeline at `path` (the class its `model_index.json` names) with `unet` in place of its UNet."""
    pipeline = DiffusionPipeline.from_pretrained(path, unet=unet, dtype=dtype)
    pipeline.__class__ = _session_per_call(type(pipeline))
    return pipeline
