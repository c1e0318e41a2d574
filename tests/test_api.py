"""The OpenAI-compatible API (`python -m swarm.api`) over a tiny Llama on two real servers, driven by the official
`openai` package and by plain HTTP: answers equal the local model's greedy generation, streamed or not; errors come
in OpenAI's format with the right status."""

from __future__ import annotations

import shutil

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from swarm.launch import LocalSwarm, PeerProcess

KEY = "test-key"
SYMBOLS = ["<unk>", "<pad>", "<eos>", *"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'<>:\n0123456789"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def with_tokenizer(model_dir, directory):
    """A copy of the tiny Llama with a character tokenizer (its 131 ids cover the symbols) and a chat template."""
    shutil.copytree(model_dir, directory)
    tokenizer = Tokenizer(models.WordLevel({symbol: index for index, symbol in enumerate(SYMBOLS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def api(tiny_llama, tmp_path_factory):
    """(base URL, model folder, tokenizer)."""
    directory = with_tokenizer(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama")
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(directory, ["0:2", "2:5"], log_dir=logs) as swarm:
        args = ["-m", "swarm.api", str(directory), "--initial-peers", *swarm.initial_peers, "--port", "0", "--api-key", KEY]
        process = PeerProcess(args, name="api", log_path=logs / "api.log")
        try:
            url = process.wait_for(r"ready: API for \S+ at (http://\S+)", 120).group(1)
            yield url, directory, PreTrainedTokenizerFast.from_pretrained(directory)
        finally:
            process.stop()


def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api[0], api_key=KEY, max_retries=0, timeout=60)


def local_answer(local, tokenizer, text: str, max_tokens: int) -> str:
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    output = local.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=1)
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def test_models_lists_the_served_model(api):
    assert [model.id for model in client(api).models.list().data] == ["tiny-llama"]


def test_completion_equals_local_greedy_generation(api, local_tiny_llama):
    completion = client(api).completions.create(model="tiny-llama", prompt="hello swarm", max_tokens=12, temperature=0)
    assert completion.choices[0].text == local_answer(local_tiny_llama, api[2], "hello swarm", 12)
    assert completion.choices[0].finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 12)


def test_chat_streamed_and_not_equals_local_greedy_generation(api, local_tiny_llama):
    messages = [{"role": "user", "content": "Say hi."}]
    rendered = api[2].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = local_answer(local_tiny_llama, api[2], rendered, 10)
    answer = client(api).chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0)
    assert answer.choices[0].message.content == expected and answer.choices[0].message.role == "assistant"
    chunks = client(api).chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10, temperature=0, stream=True)
    pieces, reasons = [], []
    for chunk in chunks:
        pieces.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == expected and reasons[-1] == "length"


def test_sampling_with_a_seed_gives_n_reproducible_choices(api):
    settings = dict(model="tiny-llama", prompt="abc", max_tokens=8, temperature=0.9, top_p=0.95, seed=3, n=2)
    first, second = client(api).completions.create(**settings), client(api).completions.create(**settings)
    assert [choice.text for choice in first.choices] == [choice.text for choice in second.choices]
    assert [choice.index for choice in first.choices] == [0, 1]


def test_errors_come_in_openai_format_with_the_right_status(api):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client(api).completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client(api).completions.create(model="tiny-llama", prompt="hi", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="exceed the model's 1024 positions"):
        client(api).completions.create(model="tiny-llama", prompt="a" * 1100, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=api[0], api_key="wrong", max_retries=0).models.list()
    reply = httpx.post(f"{api[0]}/chat/completions", json={"model": "tiny-llama", "messages": []}, headers={"Authorization": f"Bearer {KEY}"})
    assert reply.status_code == 400 and set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_plain_http_completion(api, local_tiny_llama):
    body = {"model": "tiny-llama", "prompt": "xyz", "max_tokens": 5, "temperature": 0}
    reply = httpx.post(f"{api[0]}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == local_answer(local_tiny_llama, api[2], "xyz", 5)
