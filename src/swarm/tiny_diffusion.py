"""Stable Diffusion pipelines with random weights, built from configs: a swarm to try, test and measure
without downloading anything (needs the `diffusion` extra).

    path = make_stable_diffusion("tiny-sd", unet=TINY_UNET)
    # python -m swarm.server tiny-sd --new-swarm ...
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# A 3-level UNet with cross-attention in two levels; a few milliseconds per step on a CPU.
TINY_UNET = dict(
    sample_size=8, block_out_channels=(16, 24, 32), layers_per_block=1, cross_attention_dim=32,
    attention_head_dim=4, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip


def letters_tokenizer(positions: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters, with a few merges ("the", "and", "fox", "ox")."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {letter: 2 + i for i, letter in enumerate(letters)}
    vocab |= {f"{letter}</w>": 28 + i for i, letter in enumerate(letters)}
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "x</w>"), ("f", "ox</w>")]
    for first, second in merges:
        vocab[first + second] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=positions)


def make_stable_diffusion(
    directory: str | Path,
    unet: dict,
    text_intermediate: int = 37,
    positions: int = 16,
    vae_channels: tuple[int, ...] = (8, 8, 8, 8),
    seed: int = 0,
) -> Path:
    """Saves a pipeline with the UNet config `unet` (its `cross_attention_dim` is the text encoder's width),
    a 2-layer CLIP text encoder over `positions` tokens and a 4-level VAE (latents 1/8 of the image) to
    `directory`; returns it."""
    torch.manual_seed(seed)
    tokenizer = letters_tokenizer(positions)
    text_hidden = unet["cross_attention_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_intermediate, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=positions, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=vae_channels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )  # fmt: skip
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=UNet2DConditionModel(**unet),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(directory)  # fmt: skip
    return Path(directory)
