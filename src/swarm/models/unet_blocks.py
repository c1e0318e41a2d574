"""The blocks of a Stable Diffusion UNet as swarm cuts it (see `swarm.models.unet`): pairs of a down block and the
up block that consumes its skips, and the mid block, each run as diffusers' own modules."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PairSkips:
    """What a pair's down half leaves for its up half within one step."""

    tensors: list[torch.Tensor]  # the down half's input, then each resnet's output, as the up block pops them
    output_size: torch.Size  # spatial size of the down half's output: the way back arrives at this size


def has_cross_attention(module: nn.Module | None) -> bool:
    return bool(getattr(module, "has_cross_attention", False))


class UNetPair(nn.Module):
    """Block k < n: down_blocks[k]; up_blocks[n-1-k] without its upsampler; the upsampler of up_blocks[n-2-k],
    which brings the deeper level's output up to this level; and, in block 0, conv_in and the head."""

    def __init__(self, unet, index: int):
        super().__init__()
        num_pairs = len(unet.down_blocks)
        self.down = unet.down_blocks[index]
        self.up = unet.up_blocks[num_pairs - 1 - index]
        self.up.upsamplers = None
        self.upsamplers = unet.up_blocks[num_pairs - 2 - index].upsamplers if index < num_pairs - 1 else None
        first = index == 0
        self.conv_in = unet.conv_in if first else None
        self.conv_norm_out = unet.conv_norm_out if first else None
        self.conv_act = unet.conv_act if first else None
        self.conv_out = unet.conv_out if first else None

    @property
    def has_cross_attention(self) -> bool:
        return has_cross_attention(self.down) or has_cross_attention(self.up)

    def input_channels(self) -> int:
        return self.conv_in.in_channels if self.conv_in is not None else self.down.resnets[0].in_channels

    def emb_width(self) -> int | None:
        projection = getattr(self.down.resnets[0], "time_emb_proj", None)
        return projection.in_features if projection is not None else None

    def way_back_channels(self, skips: PairSkips) -> int:
        """Channels of what the way back brings to this pair: the up block's first resnet takes them and the last skip."""
        return self.up.resnets[0].in_channels - skips.tensors[-1].shape[1]

    def run_down(self, sample: torch.Tensor, emb: torch.Tensor, conditioning: dict) -> tuple[torch.Tensor, PairSkips]:
        if self.conv_in is not None:
            sample = self.conv_in(sample)
        if has_cross_attention(self.down):
            output, res_samples = self.down(hidden_states=sample, temb=emb, cross_attention_kwargs=None, **conditioning)
        else:
            output, res_samples = self.down(hidden_states=sample, temb=emb)
        return output, PairSkips([sample, *res_samples[: len(self.down.resnets)]], output.shape[-2:])

    def run_up(self, sample: torch.Tensor, emb: torch.Tensor, skips: PairSkips, conditioning: dict) -> torch.Tensor:
        level_size = skips.tensors[0].shape[-2:]
        for upsampler in self.upsamplers or ():
            sample = upsample(upsampler, sample, emb, level_size)
        arguments = dict(hidden_states=sample, temb=emb, res_hidden_states_tuple=tuple(skips.tensors), upsample_size=None)
        if has_cross_attention(self.up):
            sample = self.up(**arguments, cross_attention_kwargs=None, **conditioning)
        else:
            sample = self.up(**arguments)
        if self.conv_out is not None:
            if self.conv_norm_out is not None:
                sample = self.conv_act(self.conv_norm_out(sample))
            sample = self.conv_out(sample)
        return sample


class UNetMid(nn.Module):
    """Block n: the mid block (an identity when the model has none)."""

    def __init__(self, unet):
        super().__init__()
        self.mid_block = unet.mid_block

    @property
    def has_cross_attention(self) -> bool:
        return has_cross_attention(self.mid_block)

    def input_channels(self) -> int | None:
        return self.mid_block.resnets[0].in_channels if self.mid_block is not None else None

    def emb_width(self) -> int | None:
        projection = getattr(self.mid_block.resnets[0], "time_emb_proj", None) if self.mid_block is not None else None
        return projection.in_features if projection is not None else None

    def run(self, sample: torch.Tensor, emb: torch.Tensor, conditioning: dict) -> torch.Tensor:
        if self.mid_block is None:
            return sample
        if has_cross_attention(self.mid_block):
            return self.mid_block(sample, emb, cross_attention_kwargs=None, **conditioning)
        return self.mid_block(sample, emb)


def upsample(upsampler: nn.Module, sample: torch.Tensor, emb: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Calls an up block's upsampler as its block would: a resnet with the time embedding, an `Upsample2D`
    with the target size when it is not twice the input's (as diffusers does for odd latent sizes)."""
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(upsampler, ResnetBlock2D):
        return upsampler(sample, emb)
    doubled = tuple(size) == tuple(2 * length for length in sample.shape[-2:])
    return upsampler(sample, None if doubled else size)


def build_unet(config):
    """The whole `UNet2DConditionModel` of `config` (call it under `init_empty_weights`: it stays on the meta device)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(config.values)


def cross_attention_width(blocks: list[nn.Module]) -> int | None:
    """The width of the encoder hidden states that the cross-attention layers among `blocks` take."""
    from diffusers.models.attention_processor import Attention

    for block in blocks:
        for module in block.modules():
            if isinstance(module, Attention) and module.is_cross_attention:  # keys from added projections, if any
                return module.added_kv_proj_dim or module.cross_attention_dim
    return None
