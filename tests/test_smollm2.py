"""The real model we have offline, SmolLM2-135M-Instruct, through three servers: the same answer as locally."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm
from swarm.smollm2 import smollm2_checkpoint


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_checkpoint()


def test_smollm2_through_three_servers_answers_like_the_local_model(smollm2, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    expected = local.generate(input_ids, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    del local
    with LocalSwarm(smollm2, ["0:10", "10:20", "20:30"], log_dir=tmp_path) as swarm:
        model = AutoDistributedModel.from_pretrained(smollm2, initial_peers=swarm.initial_peers)
        try:
            with model.inference_session(max_length=64) as session:
                result = model.generate(
                    input_ids, max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True
                )
            assert [str(hop.span) for hop in session.route] == ["0:10", "10:20", "20:30"]
        finally:
            model.remote.shutdown()
    assert torch.equal(result.sequences, expected.sequences)
    for remote_logits, local_logits in zip(result.logits, expected.logits):
        torch.testing.assert_close(remote_logits, local_logits, atol=1e-4, rtol=0)
    answer = tokenizer.decode(result.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
