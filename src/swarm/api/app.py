"""An OpenAI-compatible HTTP API over a distributed causal LM (FastAPI): `create_app(model, tokenizer, name)`.

    GET  /v1/models              the one model served
    POST /v1/completions         {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream"}
    POST /v1/chat/completions    {"model", "messages", ...}: the messages rendered with the tokenizer's chat template
    GET  /v1/swarm               the live map of the swarm (see `swarm.api.swarm_map`)
    GET  /                       a web page: a chat with streamed answers beside the live map (files in `static/`)

Each request generates in an inference session of its own (`model.generate`), in a worker thread, so requests run
side by side. With `"stream": true` the answer comes as server-sent events, one per piece of text, then `[DONE]`;
a client that disconnects stops its generation, which closes its session on the servers. Errors come in OpenAI's
format, `{"error": {"message", "type", "param", "code"}}`, with the status that says what went wrong: 400 for bad
parameters or a prompt longer than the model takes, 401 for a missing or wrong API key, 404 for an unknown model,
503 when no server covers some blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from swarm.api.swarm_map import swarm_map
from swarm.errors import SwarmUnavailableError

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAP_MAX_AGE = 1.0  # seconds a look at the swarm is shared between the pages that ask for it


class CompletionParameters(BaseModel):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=8)
    stream: bool = False


class CompletionRequest(CompletionParameters):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(CompletionParameters):
    messages: list[ChatMessage] = Field(min_length=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


class Cancelled(StoppingCriteria):
    """Stops a generation once its client has gone."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class QueueStreamer(TextStreamer):
    """Hands each finished piece of the answer's text to an asyncio queue of the event loop, from the thread that
    generates; None marks the end."""

    def __init__(self, tokenizer, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.loop, self.queue = loop, queue

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, text)
        if stream_end:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def error_response(error: APIError) -> JSONResponse:
    body = {"message": str(error), "type": error.kind, "param": error.param, "code": error.code}
    return JSONResponse({"error": body}, status_code=error.status)


def create_app(model, tokenizer, name: str, api_key: str | None = None, default_max_tokens: int = 256) -> FastAPI:
    """The API over `model` (a distributed causal LM) with `tokenizer`, serving it as `name`."""
    app = FastAPI(title="swarm", docs_url=None, redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    chat_supported = not model.config.is_encoder_decoder and tokenizer.chat_template is not None
    last_map: dict[str, Any] = {"at": -float("inf"), "value": None}
    map_lock = asyncio.Lock()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return error_response(APIError(400, f"{param}: {first.get('msg', 'invalid request')}", param=param))

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return error_response(APIError(401, "missing or wrong API key", kind="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "swarm"}]}

    @app.get("/v1/swarm")
    async def swarm():
        async with map_lock:
            if time.monotonic() - last_map["at"] > MAP_MAX_AGE:
                last_map["value"] = await asyncio.to_thread(swarm_map, model.remote)
                last_map["at"] = time.monotonic()
        return {**last_map["value"], "name": name, "chat": chat_supported}

    def prompt_ids(parameters: CompletionParameters, text: str) -> torch.Tensor:
        if parameters.model != name:
            raise APIError(404, f"model {parameters.model!r} is not served here; this server serves {name!r}", param="model", code="model_not_found")
        input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        if max_positions is not None and input_ids.shape[1] + (parameters.max_tokens or 1) > max_positions:
            raise APIError(400, f"the prompt's {input_ids.shape[1]} tokens and max_tokens exceed the model's {max_positions} positions",
                           param="messages" if isinstance(parameters, ChatRequest) else "prompt", code="context_length_exceeded")  # fmt: skip
        return input_ids

    def generation_settings(parameters: CompletionParameters, cancelled: threading.Event) -> dict[str, Any]:
        settings = dict(max_new_tokens=parameters.max_tokens or default_max_tokens, stopping_criteria=StoppingCriteriaList([Cancelled(cancelled)]))
        if parameters.temperature > 0:
            settings.update(do_sample=True, temperature=parameters.temperature, top_p=parameters.top_p)
        else:
            settings.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if parameters.stop:
            settings.update(stop_strings=[parameters.stop] if isinstance(parameters.stop, str) else parameters.stop, tokenizer=tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return {**settings, "pad_token_id": pad}

    def generate(input_ids: torch.Tensor, settings: dict, seed: int | None, streamer=None) -> torch.Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **settings)
        except SwarmUnavailableError as error:
            raise APIError(503, str(error), kind="service_unavailable", code="swarm_unavailable") from None

    def new_tokens(output: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The generated tokens: after the prompt for a causal LM, after the decoder's start for a seq2seq model."""
        return output[0, 1:] if model.config.is_encoder_decoder else output[0, input_ids.shape[1] :]

    def finish_reason(tokens: torch.Tensor, settings: dict) -> str:
        return "length" if tokens.shape[0] >= settings["max_new_tokens"] else "stop"

    def complete(parameters: CompletionParameters, text: str, chat: bool):
        input_ids = prompt_ids(parameters, text)
        created, completion_id = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if parameters.stream:
            return StreamingResponse(stream(parameters, input_ids, created, completion_id, chat), media_type="text/event-stream")
        choices, generated = [], 0
        for index in range(parameters.n):
            settings = generation_settings(parameters, threading.Event())
            seed = None if parameters.seed is None else parameters.seed + index
            tokens = new_tokens(generate(input_ids, settings, seed), input_ids)
            generated += tokens.shape[0]
            answer = tokenizer.decode(tokens, skip_special_tokens=True)
            reason = finish_reason(tokens, settings)
            choice = {"message": {"role": "assistant", "content": answer}} if chat else {"text": answer, "logprobs": None}
            choices.append({"index": index, **choice, "finish_reason": reason})
        usage = {"prompt_tokens": input_ids.shape[1], "completion_tokens": generated, "total_tokens": input_ids.shape[1] + generated}
        kind = "chat.completion" if chat else "text_completion"
        return {"id": completion_id, "object": kind, "created": created, "model": name, "choices": choices, "usage": usage}

    async def stream(parameters: CompletionParameters, input_ids: torch.Tensor, created: int, completion_id: str, chat: bool):
        kind = "chat.completion.chunk" if chat else "text_completion"
        for index in range(parameters.n):
            cancelled = threading.Event()
            settings = generation_settings(parameters, cancelled)
            pieces: asyncio.Queue = asyncio.Queue()
            streamer = QueueStreamer(tokenizer, asyncio.get_running_loop(), pieces)
            seed = None if parameters.seed is None else parameters.seed + index
            result: dict[str, Any] = {}

            def run():
                try:
                    result["tokens"] = new_tokens(generate(input_ids, settings, seed, streamer), input_ids)
                except Exception as error:
                    result["error"] = error
                    streamer.end()

            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                if chat:
                    yield sse({"id": completion_id, "object": kind, "created": created, "model": name,
                               "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})  # fmt: skip
                while (piece := await pieces.get()) is not None:
                    delta = {"delta": {"content": piece}} if chat else {"text": piece, "logprobs": None}
                    yield sse({"id": completion_id, "object": kind, "created": created, "model": name,
                               "choices": [{"index": index, **delta, "finish_reason": None}]})  # fmt: skip
                await asyncio.to_thread(worker.join)
                if "error" in result:
                    error = result["error"]
                    message = str(error) if isinstance(error, APIError) else "the swarm failed while generating"
                    yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
                    break
                end = {"delta": {}} if chat else {"text": "", "logprobs": None}
                yield sse({"id": completion_id, "object": kind, "created": created, "model": name,
                           "choices": [{"index": index, **end, "finish_reason": finish_reason(result["tokens"], settings)}]})  # fmt: skip
            finally:
                cancelled.set()  # the client went away (or the answer is complete): the generation stops
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        return complete(request, request.prompt, chat=False)

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        messages = [message.model_dump() for message in request.messages]
        if not chat_supported:
            raise APIError(400, f"{name} has no chat template: use /v1/completions", param="messages", code="chat_not_supported")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:
            raise APIError(400, f"the model's chat template cannot render these messages: {error}", param="messages") from None
        return complete(request, text, chat=True)

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"
