"""Stable Diffusion's UNet (diffusers `UNet2DConditionModel`), cut so that skip tensors never travel.

Blocks. With n down blocks (and so n up blocks) there are n + 1 blocks:

    block k < n   a pair: down_blocks[k] and up_blocks[n-1-k], the up block that consumes exactly the skips
                  down_blocks[k] makes (its input and each of its resnets' outputs). Block 0 also holds
                  conv_in (whose output is pair 0's input and first skip) and the head (conv_norm_out,
                  conv_act, conv_out), so only latents travel between the client and block 0.
    block n       the mid block.

A server hosting blocks [a, b) holds both halves of pairs a..b-1: a ring of the U. A step is a round trip
(phases "down" then "up", see `ModelFamily.phases`): down the route, each server runs the down halves of
its pairs (the last one also the mid block) and keeps their skips in its session state, like a KV cache;
back up the route in reverse order, each server runs the up halves, popping its skips. Skips never leave
the server that made them, and the last hop turns around in one request.

Each up block's upsampler runs with the next shallower pair, on the server that consumes its output: the
way back then sends tensors before upsampling (4 times fewer bytes), and the server that upsamples knows
its level's size from the way down, so odd latent sizes need no `upsample_size` on the wire. The client
keeps the embeddings (time projection and MLP, class, addition and encoder projections: small MLPs).

What travels, with B the batch (2 per image with classifier-free guidance):

    way down, to blocks [a, b)   sample (B, C_a, H_a, W_a); emb (B, T), the time embedding; and when the
                                 session starts or the prompt changes, the conditioning it then keeps:
                                 encoder_hidden_states (B, S, D), attention_mask and encoder_attention_mask
                                 (optional biases, (B, 1, S)).
    reply                        sample: the down halves' output (the mid block's, on the last hop)
    way back                     sample in, sample out (at block 0: the noise prediction, (B, 4, H, W))

Bytes per step, float32, B = 2, SD-1.5 at 512x512 (64x64 latents; channels 320, 640, 1280, 1280; T = 1280),
across each possible cut, each way (the client relays every tensor, so each crosses two links):

    client | block 0             down 131 KB + 10 KB emb      up 131 KB
    after pair 0 (cut 1)         down 2.6 MB                  up 5.2 MB
    after pair 1 (cut 2)         down 1.3 MB                  up 2.6 MB
    after pair 2 (cut 3)         down 655 KB                  up 655 KB
    before the mid block (cut 4) down 655 KB                  up 655 KB

plus 10 KB of emb per hop on the way down, and 473 KB of prompt embeddings per hop once per image. Cutting
the UNet linearly instead sends the skip stack across each cut (46 MB after down block 1); keeping each
upsampler with its own up block makes the way back 4 times heavier (21 MB across cut 1).

Supported: the up and down block types below (SD 1.x, 2.x, SDXL's and unCLIP's UNets), any addition or class
embedding (they run on the client). Not supported: ControlNet and T2I-Adapter residuals, IP-Adapter image
projections, and `cross_attention_kwargs` (LoRA scales, attention processors), which would need the servers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from swarm.errors import ConfigurationError
from swarm.models.base import LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import require
from swarm.models.state import SequenceState
from swarm.models.unet_blocks import PairSkips, UNetMid, UNetPair, build_unet, cross_attention_width
from swarm.spans import BlockSpan

DOWN, UP = "down", "up"
SERVER_MODULES = ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")
CLIENT_MODULES = (  # everything else a UNet2DConditionModel may hold: its embeddings
    "time_proj",
    "time_embedding",
    "encoder_hid_proj",
    "class_embedding",
    "add_time_proj",
    "add_embedding",
    "time_embed_act",
)
DOWN_BLOCK_TYPES = {
    "DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"
}  # fmt: skip
UP_BLOCK_TYPES = {
    "UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"
}  # fmt: skip
CONDITIONING = ("encoder_hidden_states", "attention_mask", "encoder_attention_mask")  # kept by sessions
EXAMPLE_PROMPT_LENGTH = 77  # tokens of the prompt embeddings a server measures its speed with


@dataclass
class UNetState(SequenceState):
    """A session on some blocks: in `kept`, the conditioning it was sent (encoder_hidden_states (B, S, D), and
    the optional biases attention_mask and encoder_attention_mask (B, 1, S)); and the current step's skips."""

    emb: torch.Tensor | None = None  # (B, T): this step's time embedding, from the way down to the way back
    skips: dict[int, PairSkips] = field(default_factory=dict)  # pair index -> its skips, this step

    def conditioning(self) -> dict[str, torch.Tensor | None]:
        return {name: self.kept.get(name) for name in CONDITIONING}


class UNetFamily(ModelFamily):
    client_kind = "diffusion_unet"

    def num_pairs(self, config) -> int:
        return len(config.down_block_types)

    def num_blocks(self, config) -> int:
        return self.num_pairs(config) + 1

    def phases(self, config) -> tuple[str, ...]:
        return (DOWN, UP)

    def prepare_config(self, config):
        unsupported = (set(config.down_block_types) - DOWN_BLOCK_TYPES) | (set(config.up_block_types) - UP_BLOCK_TYPES)
        if unsupported:
            raise ConfigurationError(
                f"swarm cannot cut a UNet with blocks {sorted(unsupported)}; it serves down blocks "
                f"{sorted(DOWN_BLOCK_TYPES)} and up blocks {sorted(UP_BLOCK_TYPES)}"
            )
        if len(config.up_block_types) != len(config.down_block_types):
            raise ConfigurationError("a UNet needs as many up blocks as down blocks")
        return config

    def block_tensor_names(self, config, index: int, checkpoint_names) -> dict[str, str]:
        """Pair k: `down_blocks.{k}.*`, `up_blocks.{n-1-k}.*` but its upsampler, the upsampler of
        `up_blocks.{n-2-k}`, and in block 0 conv_in and the head. Block n: `mid_block.*`."""
        num_pairs = self.num_pairs(config)
        if index == num_pairs:
            rules = [("mid_block.", "mid_block.")]
        else:
            up = f"up_blocks.{num_pairs - 1 - index}."
            rules = [(f"down_blocks.{index}.", "down."), (up, "up.")]
            if index < num_pairs - 1:
                rules.append((f"up_blocks.{num_pairs - 2 - index}.upsamplers.", "upsamplers."))
            if index == 0:
                rules += [(f"{name}.", f"{name}.") for name in ("conv_in", "conv_norm_out", "conv_out")]
        names = {}
        for name in checkpoint_names:
            for prefix, local_prefix in rules:
                if name.startswith(prefix) and not (local_prefix == "up." and name.startswith(f"{up}upsamplers.")):
                    names[name] = local_prefix + name[len(prefix) :]
        return names

    def build_blocks(self, config, span: BlockSpan) -> list[nn.Module]:
        return [
            UNetMid(build_unet(config)) if index == self.num_pairs(config) else UNetPair(build_unet(config), index)
            for index in span
        ]

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> UNetState:
        return UNetState()  # it holds conditioning, no positions: its length stays 0

    # Checking requests

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan, phase):
        require(
            state is not None,
            "UNet blocks run in inference sessions: their skips stay on the server from the way down to the way back",
        )
        sample = inputs.get("sample")
        require(
            sample is not None and sample.ndim == 4 and min(sample.shape) > 0,
            f"a step needs 'sample' of shape (batch, channels, height, width), got {_shape(sample)}",
        )
        require(sample.dtype == loaded.dtype, f"sample must be {loaded.dtype} on this server, got {sample.dtype}")
        if phase == UP:
            self._check_way_back(loaded, inputs, state, sub_span)
        else:
            self._check_way_down(loaded, inputs, state, sub_span)

    def _check_way_down(self, loaded: LoadedSpan, inputs: Tensors, state: UNetState, sub_span: BlockSpan):
        unexpected = set(inputs) - {"sample", "emb", *CONDITIONING}
        require(not unexpected, f"unexpected tensors {sorted(unexpected)} on the way down")
        blocks, (batch, channels) = loaded.blocks_of(sub_span), inputs["sample"].shape[:2]
        expected = blocks[0].input_channels()
        require(expected in (None, channels), f"blocks {sub_span} take a sample of {expected} channels, got {channels}")
        emb, width = inputs.get("emb"), blocks[0].emb_width()
        require(
            emb is not None and emb.ndim == 2 and emb.shape[0] == batch and width in (None, emb.shape[1]),
            f"a step needs 'emb', the time embedding, of shape ({batch}, {width}), got {_shape(emb)}",
        )
        require(emb.dtype == loaded.dtype, f"emb must be {loaded.dtype} on this server, got {emb.dtype}")
        if any(name in inputs for name in CONDITIONING):
            self._check_conditioning(loaded, inputs, blocks, batch)
        encoder = inputs.get("encoder_hidden_states", state.kept.get("encoder_hidden_states"))
        if any(block.has_cross_attention for block in blocks):
            require(encoder is not None, "these blocks need 'encoder_hidden_states' (in a session: when it starts)")
        if encoder is not None:
            require(
                encoder.shape[0] == batch,
                f"the session's encoder_hidden_states have a batch of {encoder.shape[0]}, the sample {batch}",
            )

    def _check_conditioning(self, loaded: LoadedSpan, inputs: Tensors, blocks: list[nn.Module], batch: int):
        encoder, width = inputs.get("encoder_hidden_states"), cross_attention_width(blocks)
        require(
            encoder is not None and encoder.ndim == 3 and encoder.shape[1] > 0 and width in (None, encoder.shape[2]),
            f"conditioning needs 'encoder_hidden_states' of shape (batch, tokens, {width}), got {_shape(encoder)}",
        )
        require(encoder.dtype == loaded.dtype, f"encoder_hidden_states must be {loaded.dtype}, got {encoder.dtype}")
        for name in ("attention_mask", "encoder_attention_mask"):
            mask = inputs.get(name)
            require(
                mask is None or (tuple(mask.shape) == (batch, 1, encoder.shape[1]) and mask.dtype == loaded.dtype),
                f"{name} must be a {loaded.dtype} bias of shape ({batch}, 1, {encoder.shape[1]}), got {_shape(mask)}",
            )

    def _check_way_back(self, loaded: LoadedSpan, inputs: Tensors, state: UNetState, sub_span: BlockSpan):
        require(set(inputs) == {"sample"}, f"the way back takes only 'sample', got {sorted(inputs)}")
        pairs = [index for index in sub_span if index < self.num_pairs(loaded.config)]
        if not pairs:
            return
        require(
            all(index in state.skips for index in pairs),
            f"the way back through blocks {sub_span} needs this step's way down first",
        )
        deepest, skips = loaded.blocks_of(BlockSpan(pairs[-1], pairs[-1] + 1))[0], state.skips[pairs[-1]]
        expected = (skips.tensors[0].shape[0], deepest.way_back_channels(skips), *skips.output_size)
        require(
            tuple(inputs["sample"].shape) == expected,
            f"the way back into blocks {sub_span} takes a sample of shape {expected}, got {_shape(inputs['sample'])}",
        )

    # Running blocks

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        if state is None:
            return self._measure(loaded, sub_span, inputs)
        if phase == UP:
            return {"sample": self._way_back(loaded, sub_span, inputs["sample"], state)}
        if any(name in inputs for name in CONDITIONING):
            state.kept = {name: inputs[name].to(loaded.device) for name in CONDITIONING if inputs.get(name) is not None}
        return {"sample": self._way_down(loaded, sub_span, inputs["sample"], inputs["emb"], state)}

    def _way_down(self, loaded: LoadedSpan, sub_span: BlockSpan, sample, emb, state: UNetState) -> torch.Tensor:
        """Down halves of the pairs in order (and the mid block), keeping their skips: (B, C, H, W) -> deeper."""
        sample, state.emb, state.skips = sample.to(loaded.device), emb.to(loaded.device), {}
        conditioning = state.conditioning()
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            if isinstance(block, UNetMid):
                sample = block.run(sample, state.emb, conditioning)
            else:
                sample, state.skips[index] = block.run_down(sample, state.emb, conditioning)
        return sample

    def _way_back(self, loaded: LoadedSpan, sub_span: BlockSpan, sample, state: UNetState) -> torch.Tensor:
        """Up halves of the pairs in reverse order, popping their skips."""
        sample, conditioning = sample.to(loaded.device), state.conditioning()
        for index, block in reversed(list(zip(sub_span, loaded.blocks_of(sub_span)))):
            if isinstance(block, UNetPair):
                sample = block.run_up(sample, state.emb, state.skips.pop(index), conditioning)
        state.emb = None
        return sample

    def _measure(self, loaded: LoadedSpan, span: BlockSpan, inputs: Tensors) -> Tensors:
        """Both halves of every hosted block, as a step would run them (the server measures its speed so).
        Without the mid block, the way back starts from zeros of the shape a deeper server would send."""
        state = UNetState(kept={name: inputs[name] for name in CONDITIONING if inputs.get(name) is not None})
        sample = self._way_down(loaded, span, inputs["sample"], inputs["emb"], state)
        if self.num_pairs(loaded.config) not in span:
            deepest, skips = loaded.blocks[-1], state.skips[span.end - 1]
            shape = (sample.shape[0], deepest.way_back_channels(skips), *skips.output_size)
            sample = torch.zeros(shape, dtype=loaded.dtype, device=loaded.device)
        return {"sample": self._way_back(loaded, span, sample, state)}

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        """One image without guidance at the model's sample size, scaled down to the first block's level."""
        config, blocks = loaded.config, list(loaded.blocks)
        size = config.sample_size if isinstance(config.sample_size, (list, tuple)) else (config.sample_size,) * 2
        level = min(loaded.span.start, self.num_pairs(config) - 1)
        height, width = (max(1, math.ceil(length / 2**level)) for length in size)
        channels = blocks[0].input_channels() or config.block_out_channels[-1]
        emb_width = next(filter(None, (block.emb_width() for block in blocks)), 1)
        options = dict(dtype=loaded.dtype, device=loaded.device)
        inputs = {"sample": torch.zeros(1, channels, height, width, **options), "emb": torch.zeros(1, emb_width, **options)}
        if any(block.has_cross_attention for block in blocks):
            tokens, encoder_width = EXAMPLE_PROMPT_LENGTH, cross_attention_width(blocks)
            inputs["encoder_hidden_states"] = torch.zeros(1, tokens, encoder_width, **options)
        return inputs

    # Client side: the embeddings stay on the client; the rest of the pipeline (text encoder, VAE,
    # scheduler) is diffusers' own.

    def client_skeleton(self, config) -> nn.Module:
        from accelerate import init_empty_weights

        with init_empty_weights():
            unet = build_unet(config)
        unknown = {name for name, _ in unet.named_children()} - set(SERVER_MODULES) - set(CLIENT_MODULES)
        if unknown:
            raise ConfigurationError(f"swarm does not know where the UNet's modules {sorted(unknown)} run")
        return unet

    def client_removed(self, config) -> tuple[str, ...]:
        return SERVER_MODULES


def _shape(tensor: torch.Tensor | None):
    return tuple(tensor.shape) if tensor is not None else None
