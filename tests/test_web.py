"""The web page at `/` of `python -m swarm.api`, in a real headless browser: Debian's chromium driven by
Playwright (`make test` installs chromium). Over a tiny Llama on three servers, the page asks for the API key,
streams a chat answer that equals the local model's greedy generation, maps every server and the route the answer
took, loads nothing from outside, and drops a killed server from the map, its blocks turning red."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from playwright.sync_api import sync_playwright
from transformers import PreTrainedTokenizerFast

from swarm.launch import LocalSwarm, PeerProcess
from tests.test_api import KEY, with_tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# no background connections: the machine's network is closed, and a test page needs none
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
SPANS = ["0:2", "2:4", "4:5"]

# Records, in the page, each change of the first answer's text: (milliseconds since it was installed, length).
WATCH_ANSWER = """() => {
  window.answerChanges = [];
  const started = performance.now();
  new MutationObserver(() => {
    const answer = document.querySelector('.message.assistant');
    if (answer) window.answerChanges.push([performance.now() - started, answer.textContent.length]);
  }).observe(document.querySelector('#messages'), {childList: true, subtree: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def web(tiny_llama, tmp_path_factory):
    """(page URL, tokenizer, swarm) of the API with a key over a tiny Llama on three servers."""
    directory = with_tokenizer(tiny_llama, tmp_path_factory.mktemp("models") / "tiny-llama")
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(directory, SPANS, log_dir=logs) as swarm:
        args = ["-m", "swarm.api", str(directory), "--initial-peers", *swarm.initial_peers, "--port", "0", "--api-key", KEY]
        process = PeerProcess(args, name="api", log_path=logs / "api.log")
        try:
            url = process.wait_for(r"ready: API for \S+ at (http://\S+)/v1", 120).group(1)
            yield url, PreTrainedTokenizerFast.from_pretrained(directory), swarm
        finally:
            process.stop()


@pytest.fixture(scope="module")
def page(web):
    assert Path(CHROMIUM).exists(), f"no chromium at {CHROMIUM}: `make test` (make browser) installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.requests = []
            page.on("request", lambda request: page.requests.append(request.url))
            page.goto(web[0] + "/")
            yield page
        finally:
            browser.close()


def server_rows(page) -> dict[str, str]:
    """The map's servers: peer id -> address."""
    rows = page.locator("#servers tbody tr")
    return {rows.nth(index).get_attribute("data-peer-id"): rows.nth(index).locator("td.address").text_content() for index in range(rows.count())}


def test_the_page_asks_for_the_key_then_maps_every_server(page, web):
    page.locator("#key-form").wait_for(state="visible")
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_function("document.querySelectorAll('#servers tbody tr').length === 3")
    assert sorted(server_rows(page).values()) == sorted(server.address for server in web[2].servers)
    assert page.locator("#coverage .block").count() == 5 and page.locator("#coverage .block.gap").count() == 0
    assert page.locator("#model-name").text_content() == "tiny-llama: 5 blocks"


def test_a_chat_answer_streams_in_and_equals_local_greedy_generation(page, web, local_tiny_llama):
    tokenizer = web[1]
    messages = [{"role": "user", "content": "Say hi."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    input_ids = tokenizer(rendered, return_tensors="pt", add_special_tokens=False).input_ids
    output = local_tiny_llama.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=60, do_sample=False, pad_token_id=1)
    expected = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)

    page.evaluate(WATCH_ANSWER)
    page.fill("#max-tokens", "60")
    page.fill("#temperature", "0")
    page.fill("#prompt", "Say hi.")
    page.click("#send")
    page.locator(".message.assistant[data-done='true']").wait_for()
    answer = page.locator(".message.assistant")
    assert answer.text_content() == expected
    assert page.locator(".message.user").text_content() == "Say hi."
    changes = page.evaluate("window.answerChanges")
    lengths = sorted({length for _, length in changes if 0 < length < len(expected)})
    assert len(lengths) >= 3, f"the answer did not stream in piece by piece: {changes}"
    assert int(answer.get_attribute("data-pieces")) > 3
    assert "finished: length" in page.locator("#answer-stats").text_content()

    # the map shows the route the answer took: one hop per server, each of them marked in the table
    page.wait_for_function("document.querySelectorAll('#route li[data-peer-id]').length === 3")
    hops = page.locator("#route li").all_text_contents()
    assert [hop.split(" → ")[0] for hop in hops] == [f"blocks {span}" for span in SPANS]
    assert page.locator("#servers tbody tr.on-route").count() == 3


def test_the_page_loads_nothing_from_outside(page, web):
    assert page.requests and all(url.startswith(web[0] + "/") for url in page.requests), page.requests


def test_a_killed_server_disappears_from_the_map(page, web):
    """Runs last: it kills the server of blocks 4:5."""
    victim = web[2].servers[2]
    peer_ids = server_rows(page)
    victim_id = next(peer_id for peer_id, address in peer_ids.items() if address == victim.address)
    victim.process.kill()
    page.wait_for_function("document.querySelectorAll('#servers tbody tr').length === 2", timeout=30_000)
    assert set(server_rows(page).values()) == set(peer_ids.values()) - {victim.address}
    gaps = page.locator("#coverage .block.gap")
    assert [gaps.nth(index).get_attribute("data-block") for index in range(gaps.count())] == ["4"]
    assert page.locator("#route li.gone").get_attribute("data-peer-id") == victim_id
