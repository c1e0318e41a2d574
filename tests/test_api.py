"""The OpenAI-compatible API (`python -m swarm.api`) over a tiny Llama on two real servers, driven by the official
`openai` package and by plain HTTP: answers equal the local model's greedy generation, streamed or not; errors come
in OpenAI's format with the right status."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration, pipeline

from swarm import AutoDistributedModel
from swarm.launch import LocalSwarm, PeerProcess
from swarm.transport import Connection
from tests.test_t5 import make_tiny_t5

KEY = "test-key"
SYMBOLS = ["<unk>", "<pad>", "<eos>", *"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'<>:\n0123456789"]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def with_tokenizer(model_dir, directory):
    """A copy of the model at `model_dir` (or the model at `directory` itself) with a character tokenizer (the tiny
    models' ids cover its symbols) and a chat template (none for a seq2seq model)."""
    if model_dir is not None:
        shutil.copytree(model_dir, directory)
    tokenizer = Tokenizer(models.WordLevel({symbol: index for index, symbol in enumerate(SYMBOLS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = TEMPLATE if model_dir is not None else None
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def api(tiny_llama, tmp_path_factory):
    """(base URL, model folder, tokenizer, swarm)."""
    directory = with_tokenizer(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama")
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(directory, ["0:2", "2:5"], log_dir=logs) as swarm:
        args = ["-m", "swarm.api", str(directory), "--initial-peers", *swarm.initial_peers, "--port", "0", "--api-key", KEY]
        process = PeerProcess(args, name="api", log_path=logs / "api.log")
        try:
            url = process.wait_for(r"ready: API for \S+ at (http://\S+)", 120).group(1)
            yield url, directory, PreTrainedTokenizerFast.from_pretrained(directory), swarm
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



def test_the_swarm_map_lists_the_servers_coverage_and_last_route(api):
    client(api).completions.create(model="tiny-llama", prompt="map", max_tokens=2, temperature=0)
    assert httpx.get(f"{api[0]}/swarm").status_code == 401
    answer = httpx.get(f"{api[0]}/swarm", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert (answer["name"], answer["num_blocks"], answer["chat"], answer["coverage"], answer["uncovered"]) == ("tiny-llama", 5, True, [1] * 5, [])
    assert sorted((s["start"], s["end"], s["address"], s["state"]) for s in answer["servers"]) == [
        (0, 2, api[3].servers[0].address, "online"), (2, 5, api[3].servers[1].address, "online")]  # fmt: skip
    assert all(s["throughput"] > 0 and s["ping_ms"] > 0 and s["sessions"] == 0 for s in answer["servers"])
    assert [(hop["start"], hop["end"], hop["address"]) for hop in answer["route"]] == [
        (0, 2, api[3].servers[0].address), (2, 5, api[3].servers[1].address)]  # fmt: skip

def open_sessions(swarm) -> int:
    total = 0
    for server in swarm.servers:
        connection = Connection(server.address, timeout=10)
        try:
            total += connection.request({"method": "info"})[0]["sessions"]
        finally:
            connection.close()
    return total


def test_a_client_that_disconnects_mid_stream_frees_its_session(api):
    stream = client(api).completions.create(model="tiny-llama", prompt="go on", max_tokens=900, temperature=0, stream=True)
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].text is not None
    assert open_sessions(api[3]) == 2  # one per server of the route, while the answer streams
    stream.close()
    deadline = time.monotonic() + 20
    while open_sessions(api[3]):
        assert time.monotonic() < deadline, "the servers still hold the session of a client that left"
        time.sleep(0.2)


def test_eight_clients_at_once_each_get_their_own_answer(api, local_tiny_llama):
    prompts = [f"prompt number {index}" for index in range(8)]
    answers = {}

    def ask(prompt: str):
        answers[prompt] = client(api).completions.create(model="tiny-llama", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == {prompt: local_answer(local_tiny_llama, api[2], prompt, 8) for prompt in prompts}


def test_text_generation_pipeline_matches_the_local_model(api, local_tiny_llama):
    model = AutoDistributedModel.from_pretrained(api[1], initial_peers=api[3].initial_peers)
    try:
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
        remote = pipeline("text-generation", model=model, tokenizer=api[2])("hello", **settings)
        expected = pipeline("text-generation", model=local_tiny_llama, tokenizer=api[2])("hello", **settings)
        assert remote == expected
    finally:
        model.remote.shutdown()


@pytest.fixture(scope="module")
def t5_api(tmp_path_factory):
    """(base URL, model folder, tokenizer, local model, swarm) of a tiny T5 on two servers."""
    # as deep a decoder as its encoder: transformers sizes the local model's default cache by the encoder's depth
    directory = make_tiny_t5(tmp_path_factory.mktemp("models") / "tiny-t5", num_decoder_layers=3)
    with_tokenizer(None, directory)
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(directory, ["0:4", "4:6"], log_dir=logs) as swarm:
        args = ["-m", "swarm.api", str(directory), "--initial-peers", *swarm.initial_peers, "--port", "0", "--coverage-timeout", "3"]
        process = PeerProcess(args, name="api", log_path=logs / "api.log")
        try:
            url = process.wait_for(r"ready: API for \S+ at (http://\S+)", 120).group(1)
            local = T5ForConditionalGeneration.from_pretrained(directory).eval()
            yield url, directory, PreTrainedTokenizerFast.from_pretrained(directory), local, swarm
        finally:
            process.stop()


def test_seq2seq_completions_match_the_local_model(t5_api):
    """(transformers 5 has no text2text-generation pipeline any more.)"""
    url, directory, tokenizer, local, swarm = t5_api
    input_ids = tokenizer("translate this", return_tensors="pt", add_special_tokens=False).input_ids
    output = local.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=7, do_sample=False, pad_token_id=1)
    expected = tokenizer.decode(output[0, 1:], skip_special_tokens=True)
    completion = openai.OpenAI(base_url=url, api_key="none", max_retries=0).completions.create(model="tiny-t5", prompt="translate this", max_tokens=7, temperature=0)
    assert completion.choices[0].text == expected
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        openai.OpenAI(base_url=url, api_key="none", max_retries=0).chat.completions.create(model="tiny-t5", messages=[{"role": "user", "content": "hi"}])


def test_text2text_generation_pipeline_matches_the_local_model(t5_api):
    """transformers 5 removed the task; swarm's client registers it again (`swarm.pipelines`)."""
    url, directory, tokenizer, local, swarm = t5_api
    model = AutoDistributedModel.from_pretrained(directory, initial_peers=swarm.initial_peers)
    try:
        settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
        remote = pipeline("text2text-generation", model=model, tokenizer=tokenizer)
        expected = pipeline("text2text-generation", model=local, tokenizer=tokenizer)
        assert remote("translate this", **settings) == expected("translate this", **settings)
        texts = ["abc", "a longer input text"]
        answers = remote(texts, **settings)
        assert answers == expected(texts, **settings) and len(answers) == 2 and set(answers[0]) == {"generated_text"}
        beams = remote("abc", num_beams=3, num_return_sequences=2, max_new_tokens=4, pad_token_id=1)
        assert beams == expected("abc", num_beams=3, num_return_sequences=2, max_new_tokens=4, pad_token_id=1) and len(beams) == 2
    finally:
        model.remote.shutdown()


def test_no_servers_for_the_model_is_a_503_naming_the_blocks(t5_api):
    """The API waits --coverage-timeout (3 s here) for other servers, then answers 503 naming the blocks (the
    encoder's: the first request a generation makes)."""
    url, _, _, _, swarm = t5_api
    for server in swarm.servers:
        server.stop()
    with pytest.raises(openai.InternalServerError, match=r"blocks \[0, 3\) of model 'tiny-t5'") as error:
        openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60).completions.create(model="tiny-t5", prompt="hi", max_tokens=2)
    assert error.value.status_code == 503


def test_swarm_serve_answers_through_the_api_and_stops_everything(tmp_path):
    """`make serve`: SmolLM2 on three local servers behind the API; SIGTERM stops the servers too."""
    process = PeerProcess(["-m", "swarm.serve", "--port", "0"], name="serve", log_path=tmp_path / "serve.log")
    try:
        url = process.wait_for(r"ready: API for \S+ at (http://\S+)", 240).group(1)
        page = process.wait_for(r"Chat and live swarm map: (http://\S+)", 10).group(1)
        assert page == url.removesuffix("v1") and "<title>swarm</title>" in httpx.get(page).text
        name = openai.OpenAI(base_url=url, api_key="none").models.list().data[0].id
        answer = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120).chat.completions.create(
            model=name, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8, temperature=0
        )
        assert "Paris" in answer.choices[0].message.content
        process.signal(signal.SIGTERM)
        assert process.process.wait(60) is not None
    finally:
        process.stop()

