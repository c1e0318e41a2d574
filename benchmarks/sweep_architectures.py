"""Every causal LM (or, with `--encoders`, every base model) of the installed transformers, served by swarm's
generic decoder (encoder) family: exact, refused, or broken?

    python benchmarks/sweep_architectures.py [MODEL_TYPE ...] [--encoders] [--timeout 180]

For each model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (with `--encoders`: in `MODEL_MAPPING_NAMES`, saved as
its base model, whose main input must be `input_ids` or `pixel_values`), or those given, in a process of its own (at most 8 GiB, `--timeout` seconds): builds the type's default config shrunk to
a tiny random model, saves it, and
- OK / WRONG: the client (the model's own class with its layers replaced by swarm's stand-in) over two spans
  `[0, 1)` and `[1, n)` run in this process by `family.forward`, against the local model: largest difference
  of the logits (an encoder's last hidden states) on a batch of 2 x 9 tokens, the second padded after 6 (two
  random images), OK below 1e-4. No network: this checks the family, not transport;
- UNSUPPORTED: swarm refused it with `UnsupportedModelError` (the reason is printed);
- ERROR: anything else went wrong while serving it (a bug, or a shrunk config the model itself rejects);
- SKIP: the shrunk config or the local model could not be built or run (not swarm's doing).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

SHRINK = dict(
    hidden_size=64, n_embd=64, d_model=64, intermediate_size=96, ffn_dim=96, n_inner=96, num_hidden_layers=3, n_layer=3,
    num_layers=3, num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
    max_position_embeddings=256, n_positions=256, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
    sliding_window=5, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
)  # fmt: skip
MEMORY_LIMIT = 8 << 30


class InProcessSpans:
    """Runs a client's requests through spans loaded in this process, as servers would (forward only)."""

    def __init__(self, family, spans):
        self.family, self.spans = family, spans

    def forward(self, tensors, span):
        tensors = {name: tensor for name, tensor in tensors.items() if tensor is not None}
        for loaded in self.spans:
            if span.start <= loaded.span.start and loaded.span.end <= span.end:
                self.family.check_inputs(loaded, tensors, None, None, loaded.span, None)
                tensors.update(self.family.forward(loaded, loaded.span, tensors, None, None))
        return tensors


def example_inputs(model, config) -> dict:
    """A padded batch of token ids, or two random images, for `model`'s main input."""
    import torch

    generator = torch.Generator().manual_seed(1)
    if model.main_input_name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=generator)}
    if model.main_input_name != "input_ids":
        raise ValueError(f"its main input is {model.main_input_name}, which this sweep does not make")
    input_ids = torch.randint(3, 128, (2, 9), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.tensor([[1] * 9, [1] * 6 + [0] * 3])}


def check(model_type: str, encoders: bool) -> str:
    """One line: the verdict for `model_type`."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from swarm.checkpoint import CheckpointIndex
    from swarm.client.base import load_client_model
    from swarm.client.causal_lm import DistributedModelForCausalLM
    from swarm.client.encoder import DistributedEncoderModel
    from swarm.errors import UnsupportedModelError
    from swarm.models import family_for
    from swarm.models.base import load_span
    from swarm.spans import BlockSpan

    auto_class, mixin = (AutoModel, DistributedEncoderModel) if encoders else (AutoModelForCausalLM, DistributedModelForCausalLM)
    try:
        config = CONFIG_MAPPING[model_type]()
        for name, value in SHRINK.items():
            if hasattr(config, name) and not isinstance(getattr(config, name), (list, dict)):
                setattr(config, name, value)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        torch.manual_seed(0)
        directory = Path(tempfile.mkdtemp()) / model_type
        auto_class.from_config(config).save_pretrained(directory)
        local = auto_class.from_pretrained(directory, dtype=torch.float32).eval()
        inputs = example_inputs(local, config) if encoders else {"input_ids": torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))}
        with torch.no_grad():
            torch.manual_seed(2)  # the same draws for models that draw in their forward (ViT-MAE's patch masking)
            expected = local(**inputs)[0]
    except Exception as error:
        return f"SKIP {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    try:
        config = AutoConfig.from_pretrained(directory)
        family = family_for(config)
        config = family.prepare_config(config)
        checkpoint, blocks = CheckpointIndex(directory), family.num_blocks(config)
        spans = [load_span(family, config, checkpoint, BlockSpan(*bounds), torch.float32, "cpu") for bounds in ((0, 1), (1, blocks))]
        remote = InProcessSpans(family, spans)
        client = load_client_model(directory, config, family, remote, torch.float32, mixin)
        with torch.no_grad():
            torch.manual_seed(2)
            difference = (client(**inputs)[0] - expected).abs().max().item()
        return f"{'OK' if difference < 1e-4 else 'WRONG'} {difference:.1e}"
    except UnsupportedModelError as error:
        return f"UNSUPPORTED {str(error).split(': ', 1)[1]}"
    except Exception as error:
        where = traceback.extract_tb(error.__traceback__)[-1]
        return f"ERROR {type(error).__name__}: {str(error).splitlines()[0][:120]} ({Path(where.filename).name}:{where.lineno})"


def run_isolated(model_type: str, timeout: float, encoders: bool) -> str:
    def limit_memory():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    try:
        result = subprocess.run(
            [sys.executable, __file__, "--one", model_type, *(["--encoders"] if encoders else [])],
            capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"SKIP timed out after {timeout:.0f} s"
    verdicts = [line for line in result.stdout.splitlines() if line.startswith("verdict: ")]
    return verdicts[-1].removeprefix("verdict: ") if verdicts else f"SKIP crashed (exit code {result.returncode})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_types", nargs="*", help="default: every causal LM model type of transformers")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for one model type")
    parser.add_argument("--encoders", action="store_true", help="base models with the generic encoder family")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the isolated process's own job
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    if args.one:
        print(f"verdict: {check(args.one, args.encoders)}")
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    default = sorted(MODEL_MAPPING_NAMES if args.encoders else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    counts = Counter()
    for model_type in args.model_types or default:
        verdict = run_isolated(model_type, args.timeout, args.encoders)
        counts[verdict.split()[0]] += 1
        print(f"{model_type:28s} {verdict}", flush=True)
    print(", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())))


if __name__ == "__main__":
    main()
