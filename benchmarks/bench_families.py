"""Mixtral and T5 in the swarm against the local models, in one run.

    python benchmarks/bench_families.py [--new-tokens 32] [--repeats 3]

Tiny random models, sized so a decoding step takes milliseconds: a Mixtral (8 experts, top-2, grouped
KV heads) over 2 servers, and a T5 (uneven 4+6 depths) over 3 servers with a span that crosses from the
encoder into the decoder. For each: greedy generation of `--new-tokens` tokens (EOS suppressed), local
`generate` against the swarm's, tokens/s as the median of `--repeats` runs after a warm-up, their ratio,
and whether both produced the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm


def tiny_mixtral(directory: Path):
    config = MixtralConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).eval().save_pretrained(directory)
    return MixtralForCausalLM, ["0:4", "4:8"], {}


def tiny_t5(directory: Path):
    config = T5Config(
        vocab_size=1000, d_model=256, d_kv=32, d_ff=512, num_layers=4, num_decoder_layers=6, num_heads=8,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).eval().save_pretrained(directory)
    return T5ForConditionalGeneration, ["0:3", "3:7", "7:10"], {"cache": lambda: EncoderDecoderCache(DynamicCache(), DynamicCache())}


def tokens_per_second(model, input_ids, new_tokens: int, repeats: int, extra=None) -> tuple[float, torch.Tensor]:
    def run():
        kwargs = {name: make() for name, make in (extra or {}).items()}
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
        return new_tokens / (time.perf_counter() - started), output

    run()
    results = [run() for _ in range(repeats)]
    return statistics.median(speed for speed, _ in results), results[-1][1]


def bench(name: str, build, workdir: Path, new_tokens: int, repeats: int) -> dict:
    directory = workdir / name
    model_class, spans, extra = build(directory)
    local = model_class.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = torch.randint(2, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    local_speed, local_output = tokens_per_second(local, input_ids, new_tokens, repeats, extra)
    with LocalSwarm(directory, spans, log_dir=workdir / f"{name}-logs") as swarm:
        model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers)
        try:
            swarm_speed, swarm_output = tokens_per_second(model, input_ids, new_tokens, repeats)
        finally:
            model.remote.shutdown()
    return {
        "model": name,
        "servers": " ".join(spans),
        "local": local_speed,
        "swarm": swarm_speed,
        "ratio": swarm_speed / local_speed,
        "same": torch.equal(local_output, swarm_output),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = [
            bench("tiny-mixtral", tiny_mixtral, Path(workdir), args.new_tokens, args.repeats),
            bench("tiny-t5", tiny_t5, Path(workdir), args.new_tokens, args.repeats),
        ]
    print(f"\n{'model':<14} {'servers':<16} {'local tok/s':>12} {'swarm tok/s':>12} {'swarm/local':>12}  same tokens")
    for row in rows:
        print(
            f"{row['model']:<14} {row['servers']:<16} {row['local']:>12.1f} {row['swarm']:>12.1f} "
            f"{row['ratio']:>12.2f}  {row['same']}"
        )


if __name__ == "__main__":
    main()
