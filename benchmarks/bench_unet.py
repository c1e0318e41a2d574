"""Stable Diffusion benchmark: the UNet in the swarm against the local diffusers pipeline, in one run.

    python benchmarks/bench_unet.py [--models tiny quarter] [--steps 5] [--repeats 2]

Each model is a Stable Diffusion pipeline built from configs in a temporary folder (random weights: speed
and bytes do not depend on them), text-to-image with classifier-free guidance (batch 2), one image:

    tiny     the test suite's: UNet channels (16, 24, 32), 72x40 images (9x5 latents)
    quarter  SD-1.5's UNet at a quarter of its width: channels (80, 160, 320, 320), 2 layers per block,
             8 heads, cross-attention 768; 512x512 images (64x64 latents); a 2-layer CLIP text encoder
             (hidden 768) and a small VAE, so that the UNet dominates as it does in SD-1.5

The swarm is 2 servers on 127.0.0.1: blocks 0:2 (pairs 0 and 1) and 2:n+1 (the deeper pairs and the mid
block). For local and swarm pipelines, interleaved `--repeats` times after a warm-up, it reports:

1. Seconds per denoising step: the gaps between the pipeline's step callbacks, median over the steps
   after the first (the first includes opening the session and sending the prompt embeddings).
2. Bytes per step: every byte of every request and reply on the client's connections (headers
   included), counted at the transport, for the first step and the median of the others; next to the
   bytes the same 2-server cut would move if the skip stack travelled with the activations (a linear
   cut), and if each upsampler stayed with its own up block. These alternatives are computed from the
   tensor shapes of a forward pass on the meta device, as are the figures for SD-1.5 itself.
3. Whether the swarm's image equals the local one (max abs difference, float32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from swarm import AutoDistributedModel, wire
from swarm.launch import LocalSwarm
from swarm.tiny_diffusion import TINY_UNET, make_stable_diffusion

PROMPT = "the fox and the ox"
TEXT_TOKENS = 77  # positions of the text encoder, as in Stable Diffusion
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    sample_size=64,
)  # fmt: skip


@dataclass
class Model:
    name: str
    height: int
    width: int
    unet: dict  # UNet2DConditionModel config
    vae_channels: tuple[int, ...]


MODELS = {
    "tiny": Model("tiny", 72, 40, TINY_UNET, (8, 8, 8, 8)),
    "quarter": Model(
        "quarter", 512, 512, {**SD15_UNET, "block_out_channels": (80, 160, 320, 320), "norm_num_groups": 16},
        (16, 16, 16, 16),
    ),
}  # fmt: skip


def build_pipeline(model: Model, directory: Path) -> Path:
    text_intermediate = 2 * model.unet["cross_attention_dim"]
    return make_stable_diffusion(directory, model.unet, text_intermediate, TEXT_TOKENS, model.vae_channels)


# Measuring


class WireCounter:
    """Counts the bytes of the frames the client's connections send and receive, per denoising step."""

    def __init__(self):
        self.total = 0
        self._encode, self._decode = wire.encode, wire.decode

    def __enter__(self):
        def encode(fields, tensors=None):
            buffers = self._encode(fields, tensors)
            self.total += sum(len(buffer) for buffer in buffers)
            return buffers

        def decode(header, body):
            self.total += wire.FRAME_PREFIX.size + len(header) + len(body)
            return self._decode(header, body)

        wire.encode, wire.decode = encode, decode
        return self

    def __exit__(self, *exc_info):
        wire.encode, wire.decode = self._encode, self._decode


@dataclass
class Run:
    step_seconds: list[float]  # per step
    step_bytes: list[int]  # per step, on the client's connections
    image: np.ndarray


def run(pipe, model: Model, steps: int, counter: WireCounter | None = None) -> Run:
    marks: list[tuple[float, int]] = []

    def mark(pipeline, step, timestep, callback_kwargs):
        marks.append((time.perf_counter(), counter.total if counter else 0))
        return callback_kwargs

    started = (time.perf_counter(), counter.total if counter else 0)
    image = pipe(
        PROMPT, num_inference_steps=steps, height=model.height, width=model.width, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(0), output_type="np", callback_on_step_end=mark,
    ).images  # fmt: skip
    points = [started, *marks]
    return Run(
        [b[0] - a[0] for a, b in zip(points, points[1:])], [b[1] - a[1] for a, b in zip(points, points[1:])], image
    )


def measure(model: Model, steps: int, repeats: int, directory: Path) -> dict:
    path = build_pipeline(model, directory / model.name)
    local = StableDiffusionPipeline.from_pretrained(path)
    local.set_progress_bar_config(disable=True)
    num_blocks = len(model.unet["down_block_types"]) + 1
    with LocalSwarm(path, ["0:2", f"2:{num_blocks}"], log_dir=directory / "logs") as swarm:
        pipe = AutoDistributedModel.from_pretrained(path, initial_peers=swarm.initial_peers)
        pipe.set_progress_bar_config(disable=True)
        try:
            run(local, model, 2), run(pipe, model, 2)  # warm-up
            local_runs, swarm_runs = [], []
            for _ in range(repeats):
                local_runs.append(run(local, model, steps))
                with WireCounter() as counter:
                    swarm_runs.append(run(pipe, model, steps, counter))
        finally:
            pipe.unet.remote.shutdown()
    later = lambda runs, field: statistics.median(value for r in runs for value in getattr(r, field)[1:])  # noqa: E731
    return {
        "local_step": later(local_runs, "step_seconds"),
        "swarm_step": later(swarm_runs, "step_seconds"),
        "swarm_first_step": statistics.median(r.step_seconds[0] for r in swarm_runs),
        "first_step_bytes": statistics.median(r.step_bytes[0] for r in swarm_runs),
        "step_bytes": later(swarm_runs, "step_bytes"),
        "max_difference": float(max(np.abs(s.image - l.image).max() for s, l in zip(swarm_runs, local_runs))),
    }


# Bytes of the alternatives, from shapes


def crossing_bytes(unet_config: dict, latent: tuple[int, int], cut: int, text_tokens: int, batch: int = 2) -> dict:
    """Tensor bytes per step (float32) on a client's connections for a 2-server route cut before block `cut`
    (pairs 0..cut-1 on the first server), in three layouts. The client relays what crosses the cut, so
    it counts twice; the latents in and the prediction out count once each way."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config)
    shapes: dict[str, torch.Size | list[torch.Size]] = {}

    def keep(name, index):
        return lambda module, args, output: shapes.__setitem__((name, index), output)

    for index, block in enumerate(unet.down_blocks):
        block.register_forward_hook(keep("down", index))
    for index, block in enumerate(unet.up_blocks):
        block.register_forward_hook(keep("up", index))
        if block.upsamplers is not None:
            block.upsamplers[0].register_forward_pre_hook(lambda module, args, index=index: shapes.__setitem__(("pre-up", index), args[0]))
    if unet.mid_block is not None:
        unet.mid_block.register_forward_hook(keep("mid", 0))
    with torch.no_grad():
        sample = torch.zeros(batch, unet.config.in_channels, *latent, device="meta")
        encoder = torch.zeros(batch, text_tokens, unet.config.cross_attention_dim, device="meta")
        unet(sample, torch.tensor(1, device="meta"), encoder)
    size = lambda tensor: tensor.numel() * 4  # noqa: E731
    n, emb = len(unet.down_blocks), batch * unet.time_embedding.linear_2.out_features * 4
    ends = 2 * size(sample) + 2 * emb  # latents to block 0, prediction back, emb to each of the 2 servers
    down = shapes[("down", cut - 1)][0]
    back_ours = shapes[("mid", 0)] if cut == n else shapes[("pre-up", n - 1 - cut)]
    back_own_upsampler = shapes[("mid", 0)] if cut == n else shapes[("up", n - 1 - cut)]
    stack = [sample.new_empty(batch, unet.config.block_out_channels[0], *latent)]  # conv_in's output
    for index in range(cut):
        stack += list(shapes[("down", index)][1])
    return {
        "swarm (U-shaped)": ends + 2 * size(down) + 2 * size(back_ours),
        "upsamplers with their own up block": ends + 2 * size(down) + 2 * size(back_own_upsampler),
        "linear cut (skip stack travels)": ends + 2 * sum(map(size, stack)),
        "prompt embeddings, once per image": 2 * size(encoder),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["tiny", "quarter"])
    parser.add_argument("--steps", type=int, default=5, help="denoising steps per image")
    parser.add_argument("--repeats", type=int, default=2, help="images per pipeline after the warm-up")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-unet-") as directory:
        for name in args.models:
            model = MODELS[name]
            result = measure(model, args.steps, args.repeats, Path(directory))
            latent = (model.height // 8, model.width // 8)
            analytic = crossing_bytes(model.unet, latent, cut=2, text_tokens=TEXT_TOKENS)
            print(f"\n{name}: {model.height}x{model.width}, {args.steps} steps, guidance (batch 2), servers 0:2 + 2:end")
            print(f"  seconds per step   local {result['local_step']:.4f}   swarm {result['swarm_step']:.4f}"
                  f"   ratio {result['swarm_step'] / result['local_step']:.2f}   (swarm first step {result['swarm_first_step']:.4f})")  # fmt: skip
            print(f"  bytes per step     swarm {result['step_bytes'] / 1e6:.3f} MB measured"
                  f"   (first step {result['first_step_bytes'] / 1e6:.3f} MB)   local 0")  # fmt: skip
            for layout, nbytes in analytic.items():
                print(f"    {layout:36s} {nbytes / 1e6:8.3f} MB (tensors only)")
            print(f"  image              max |swarm - local| = {result['max_difference']:.2e}")
            print(f"  load average       {os.getloadavg()[0]:.2f}")
        print("\nSD-1.5 (shapes only), 512x512, batch 2, float32, tensor MB per step by cut (pairs before the cut on server 1):")
        for cut in range(1, 5):
            analytic = crossing_bytes(SD15_UNET, (64, 64), cut=cut, text_tokens=77)
            print(f"  cut {cut}: " + ", ".join(f"{layout} {nbytes / 1e6:.2f}" for layout, nbytes in analytic.items()))


if __name__ == "__main__":
    main()
