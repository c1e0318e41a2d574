"""Depth estimation with the backbone's layers in the swarm: `pipeline("depth-estimation")` on a local swarm.

    python examples/depth_estimation.py [--image photo.jpg] [--model DIR]

With no `--model`, builds a tiny random Depth Anything model (no model hub here: its depth map shows only that
the pieces fit); a real `DPTForDepthEstimation` or `DepthAnythingForDepthEstimation` checkpoint folder works the
same way. Starts a bootstrap peer and two servers on 127.0.0.1, runs the pipeline through them and locally,
saves the swarm's depth image next to the input, and stops everything it started.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, DPTImageProcessorPil, pipeline

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.models import family_for


def tiny_depth_anything(directory: Path) -> Path:
    backbone = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, image_size=64,
                                         patch_size=8, out_indices=[2, 4, 5, 6], reshape_hidden_states=False)  # fmt: skip
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=64, patch_size=8,
                                              neck_hidden_sizes=[16, 32, 32, 32], fusion_hidden_size=32)  # fmt: skip
    torch.manual_seed(0)
    transformers.DepthAnythingForDepthEstimation(config).eval().save_pretrained(directory)
    DPTImageProcessorPil(size={"height": 64, "width": 64}, keep_aspect_ratio=False).save_pretrained(directory)
    return directory


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", type=Path, help="an image file (default: a synthetic gradient)")
    parser.add_argument("--model", type=Path, help="a depth estimation checkpoint folder (default: a tiny random one)")
    args = parser.parse_args()
    model_dir = args.model or tiny_depth_anything(Path(tempfile.mkdtemp(prefix="depth-")))
    if args.image:
        image = Image.open(args.image).convert("RGB")
    else:
        image = Image.fromarray(np.linspace(0, 255, 96 * 128 * 3).reshape(96, 128, 3).astype(np.uint8))
    config = AutoConfig.from_pretrained(model_dir)
    blocks = family_for(config).num_blocks(config)  # the backbone's layers
    with LocalSwarm(model_dir, [f"0:{blocks // 2}", f"{blocks // 2}:{blocks}"]) as swarm:
        model = AutoDistributedModel.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            estimate = pipeline("depth-estimation", model=model, image_processor=DPTImageProcessorPil.from_pretrained(model_dir))
            result = estimate(image)
        finally:
            model.remote.shutdown()
    local_class = getattr(transformers, config.architectures[0])
    local = pipeline("depth-estimation", model=local_class.from_pretrained(model_dir).eval(),
                     image_processor=DPTImageProcessorPil.from_pretrained(model_dir))(image)  # fmt: skip
    difference = float((result["predicted_depth"] - local["predicted_depth"]).abs().max())
    output = args.image.with_suffix(".depth.png") if args.image else model_dir / "depth.png"
    result["depth"].save(output)
    print(f"depth map {tuple(result['predicted_depth'].shape)} saved to {output}; largest difference from local: {difference:.2e}")


if __name__ == "__main__":
    main()
