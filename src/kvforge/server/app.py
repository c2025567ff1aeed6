"""The OpenAI-compatible HTTP API over one engine (FastAPI; run it with uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with
server-sent events when `stream` is true), GET /v1/models; vLLM's tokenizer routes
POST /tokenize, POST /detokenize, GET /tokenizer_info; GET /health, GET /metrics
(Prometheus text); the KV cache inspector: GET /inspect (a page), GET /debug/kv (its
JSON snapshot, `server.inspect`) and GET /debug/kv/stream (snapshots as server-sent
events). Every error is an OpenAI error object: 400 for a request that is
malformed or can never run (naming the limit), 401 without the API key, 413 for a
body over max_request_bytes, 429 when the server already holds max_num_seqs +
max_queue requests, 500 if the engine failed on a request. A request whose client
goes away is aborted and its KV blocks are freed.

A completions request may hold several prompts (a list of strings or of token-id
lists) and ask for `n` samples of each (`best_of` drawn, the n likeliest kept): all
are queued at once; a prompt's later samples start when its first has computed the
prompt, so they take its full KV blocks from the prefix cache.
"""

import asyncio
import dataclasses
import functools
import html
import importlib.resources
import json
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvforge.chat_template import chat_prompt
from kvforge.engine.sampling import SamplingParams
from kvforge.errors import KVForgeError
from kvforge.server import protocol as p
from kvforge.server.async_engine import AsyncEngine, Delta, RequestStream
from kvforge.server.engine_core import EngineProcess
from kvforge.server.metrics import ServerMetrics, engine_gauges

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is there
MAX_PROMPTS_PER_REQUEST = 64
MAX_LOGPROBS = 20  # as OpenAI
MAX_REQUEST_BYTES = 16 << 20


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body: a prompt, or chat messages."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[p.ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # default True: the ids a completion would use
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    tokens: list[int]


INSPECT_COOKIE = "kvforge_token"  # where the inspector page keeps the API key
INSPECT_INTERVALS = (0.1, 10.0)  # seconds between two snapshots of /debug/kv/stream
INSPECT_PAGE = "static/inspect.html"  # in this package: one file, no outside resource


@functools.cache
def inspect_page() -> str:
    return importlib.resources.files("kvforge.server").joinpath(INSPECT_PAGE).read_text()


def build_app(
    engine,
    model_name: str,
    api_key: str | None = None,
    max_queue: int = 256,
    max_prompts_per_request: int = MAX_PROMPTS_PER_REQUEST,
    max_logprobs: int = MAX_LOGPROBS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    inspect: bool = True,
    inspect_show_text: bool = False,
) -> FastAPI:
    """The API over `engine`: a kvforge.LLM (its engine then runs on a thread of this
    process while the app is up) or an `EngineProcess` (`kvforge serve`: the engine in
    a process of its own; the app starts and stops talking to it)."""
    if isinstance(engine, EngineProcess):  # it counts max_queue itself
        aengine, metrics, limits = engine, engine.metrics, engine.limits
    else:
        metrics = ServerMetrics(lambda: engine_gauges(engine.engine))
        max_requests = engine.engine.scheduler.config.max_num_seqs + max_queue
        aengine = AsyncEngine(engine.engine, metrics, max_requests)
        limits = engine.engine.limits
    tokenizer = engine.tokenizer
    text_of = functools.lru_cache(maxsize=1 << 16)(tokenizer.token_text)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start()
        yield
        aengine.stop()

    app = FastAPI(title="kvforge", lifespan=lifespan)
    app.state.engine = aengine
    app.state.metrics = metrics

    def error_response(exc: p.APIError) -> JSONResponse:
        metrics.http_errors.labels(str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    app.add_middleware(_BodyLimit, limit=max_request_bytes, refuse=error_response)

    @app.exception_handler(p.APIError)
    async def api_error(_: Request, exc: p.APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError):
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        return error_response(p.APIError(exc.status_code, str(exc.detail)))

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise p.APIError(
                401,
                "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def check_inspect_key(request: Request) -> None:
        """As `check_key`, or the key as ?token= or in the page's cookie (a browser's
        EventSource cannot send a header)."""
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = request.query_params.get("token") or request.cookies.get(INSPECT_COOKIE) or ""
        token = urllib.parse.unquote(token)  # the page's cookie is URI-encoded
        if secrets.compare_digest(header.encode(), f"Bearer {api_key}".encode()):
            return
        if secrets.compare_digest(token.encode(), api_key.encode()):
            return
        raise p.APIError(
            401,
            "invalid or missing API key: send the header 'Authorization: Bearer <key>' "
            "or add ?token=<key>",
            code="invalid_api_key",
        )

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise p.APIError(
                400,
                f"model {name!r} is not served here; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_logprobs(value: int | None, param: str) -> None:
        if value is not None and value > max_logprobs:
            raise p.APIError(
                400,
                f"{param} must be at most {max_logprobs} (the server's --max-logprobs), "
                f"got {value}",
                param=param,
            )

    def submit(prompts: list[list[int]], params: SamplingParams, samples: int,
               body) -> list[RequestStream]:  # fmt: skip
        """Queue `samples` requests per prompt, all or none: (choice group i, sample j) is
        stream i * samples + j. A prompt's later samples wait for its first's prefill."""
        wanted = len(prompts) * samples
        if aengine.num_active + wanted > aengine.max_requests:
            raise p.APIError(
                429,
                f"the server is full: {aengine.num_active} requests running or waiting and "
                f"{wanted} asked (max_num_seqs + max_queue = {aengine.max_requests}); "
                "retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        policy = body.kv_policy_choice()
        for i, token_ids in enumerate(prompts):
            try:
                limits.check(token_ids, params, policy)
            except KVForgeError as exc:
                prefix = f"prompt {i}: " if len(prompts) > 1 else ""
                raise p.APIError(400, prefix + str(exc)) from None
        queue: asyncio.Queue = asyncio.Queue()
        streams = []
        for token_ids in prompts:
            first = None
            for j in range(samples):
                sample_params = params
                if j and params.seed is not None:  # distinct seeded samples (vLLM: seed + j)
                    sample_params = dataclasses.replace(params, seed=params.seed + j)
                if j and params.prompt_logprobs is not None and params.max_tokens:
                    # the first sample scores the prompt; the others reuse its blocks
                    sample_params = dataclasses.replace(sample_params, prompt_logprobs=None)
                try:
                    stream = aengine.submit(
                        token_ids, sample_params, body.cache_salt, policy,
                        index=len(streams), queue=queue, after=first,
                    )  # fmt: skip
                except KVForgeError as exc:  # the engine process is gone
                    for stream in streams:
                        aengine.done(stream)
                    raise p.APIError(503, str(exc), type="server_error") from None
                first = first or stream
                streams.append(stream)
        return streams

    def tokenize(prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        try:
            return tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        except KVForgeError as exc:
            raise p.APIError(400, str(exc), param="prompt") from None

    @app.get("/health")
    async def health():
        if not aengine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if inspect:

        @app.get("/debug/kv", dependencies=[Depends(check_inspect_key)])
        async def debug_kv():
            """The KV cache's snapshot between two steps (schema: `server.inspect`)."""
            if not aengine.alive:
                raise p.APIError(503, "the engine is not running")
            try:
                return await aengine.snapshot(inspect_show_text)
            except TimeoutError:
                raise p.APIError(503, "the engine did not answer within 10 s") from None

        @app.get("/debug/kv/stream", dependencies=[Depends(check_inspect_key)])
        async def debug_kv_stream(interval: float = 0.25):
            """The snapshot every `interval` seconds, as server-sent events (`data: {json}`),
            until the client goes away or the engine stops."""
            low, high = INSPECT_INTERVALS
            if not low <= interval <= high:
                raise p.APIError(400, f"interval must be between {low} and {high} seconds, "
                                 f"got {interval}", param="interval")  # fmt: skip
            if not aengine.alive:
                raise p.APIError(503, "the engine is not running")

            async def events() -> AsyncIterator[str]:
                yield f"retry: {int(interval * 4000)}\n\n"
                while aengine.alive:
                    try:
                        snapshot = await aengine.snapshot(inspect_show_text)
                    except TimeoutError:
                        yield ": the engine did not answer within 10 s\n\n"
                        continue
                    yield f"data: {json.dumps(snapshot, separators=(',', ':'))}\n\n"
                    await asyncio.sleep(interval)

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store"})  # fmt: skip

        @app.get("/inspect", include_in_schema=False)
        async def inspect(request: Request):
            """The inspector page. It holds no data: it reads /debug/kv/stream, with the
            key from ?token= (kept in a cookie here) or asked for when the stream is
            refused."""
            page = inspect_page().replace("__MODEL__", html.escape(model_name))
            response = HTMLResponse(page, headers={"Cache-Control": "no-store"})
            token = request.query_params.get("token", "")
            if api_key is not None and secrets.compare_digest(token.encode(), api_key.encode()):
                response.set_cookie(INSPECT_COOKIE, token, httponly=True, samesite="strict")
            return response

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "kvforge",
            "max_model_len": limits.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize", dependencies=[Depends(check_key)])
    async def tokenize_route(body: TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise p.APIError(400, "send either prompt or messages", param="prompt")
        if body.prompt is not None:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            tokens = await asyncio.to_thread(tokenize, body.prompt, add)
        else:
            messages = [m.as_dict() for m in body.messages]
            prompt = await asyncio.to_thread(
                chat_prompt, tokenizer, messages, body.add_generation_prompt
            )
            # by default the very ids /v1/chat/completions computes (a router hashes them)
            add = body.add_special_tokens is not False
            tokens = await asyncio.to_thread(tokenize, prompt, add)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": limits.max_model_len}

    @app.post("/detokenize", dependencies=[Depends(check_key)])
    async def detokenize_route(body: DetokenizeRequest):
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < limits.vocab_size]
        if bad:
            raise p.APIError(
                400,
                f"token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})",
                param="tokens",
            )
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/tokenizer_info", dependencies=[Depends(check_key)])
    async def tokenizer_info():
        return {**tokenizer.info(), "model_max_length": limits.max_model_len}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: p.CompletionRequest, request: Request):
        check_model(body.model)
        max_tokens = p.COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        body.check(max_tokens)
        prompts = body.prompts()
        if len(prompts) > max_prompts_per_request:
            raise p.APIError(
                400,
                f"prompt holds {len(prompts)} prompts; a request may hold at most "
                f"{max_prompts_per_request} (the server's --max-prompts-per-request)",
                param="prompt",
            )
        check_logprobs(body.logprobs, "logprobs")
        samples = body.best_of or body.n
        # best_of ranks samples by their log-probability: ask for it even when not shown
        sample_logprobs = body.logprobs if body.logprobs is not None else (
            0 if samples > body.n else None)  # fmt: skip
        prompt_logprobs = body.logprobs if body.echo else None
        params = body.sampling_params(max_tokens, sample_logprobs, prompt_logprobs)
        token_lists = await asyncio.to_thread(lambda: [tokenize(x) for x in prompts])
        streams = submit(token_lists, params, samples, body)
        view = _Choices("text", body, prompts, token_lists, samples, tokenizer, text_of)
        return await respond(view, streams, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        check_model(body.model)
        body.check()
        check_logprobs(body.top_logprobs, "top_logprobs")
        prompt = await asyncio.to_thread(
            chat_prompt, tokenizer, [m.as_dict() for m in body.messages]
        )
        token_ids = await asyncio.to_thread(tokenize, prompt)  # off the event loop: long
        # prompts take a while to tokenize, and other requests' streams must not wait
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:  # as much as the context and the pool leave
            max_tokens = limits.max_request_tokens - len(token_ids)
            if max_tokens <= 0:
                raise p.APIError(
                    400,
                    f"the messages take {len(token_ids)} tokens; a request may have at most "
                    f"{limits.max_request_tokens} (the model's context and the KV pool)",
                    param="messages",
                )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = body.sampling_params(max_tokens, logprobs)
        streams = submit([token_ids], params, body.n, body)
        view = _Choices("chat", body, [prompt], [token_ids], body.n, tokenizer, text_of)
        return await respond(view, streams, request)

    async def respond(view: "_Choices", streams: list[RequestStream], request: Request):
        """Server-sent events when the body asks to stream, else one JSON object."""
        if view.body.stream:
            return StreamingResponse(_stream(aengine, view, streams, model_name),
                                     media_type="text/event-stream")  # fmt: skip
        results = await _collect(aengine, streams, request)
        return view.whole(p.new_id(view.id_prefix), model_name, results)

    def openapi() -> dict:
        """FastAPI's schema of the request models, with this server's own limits in it."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            models = schema["components"]["schemas"]
            completion = models["CompletionRequest"]["properties"]
            completion["logprobs"]["anyOf"][0]["maximum"] = max_logprobs
            for form in completion["prompt"]["anyOf"]:  # what `prompts` checks
                items = form.get("items", {})
                if items.get("type") == "integer":  # token ids
                    items["minimum"] = 0
                elif items:  # several prompts
                    form["maxItems"] = max_prompts_per_request
                    ids = {"minItems": 1, "items": {"type": "integer", "minimum": 0}}
                    items.update({"minLength": 1} if items["type"] == "string" else ids)
            chat = models["ChatCompletionRequest"]["properties"]
            chat["top_logprobs"]["anyOf"][0]["maximum"] = max_logprobs
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 (by its
    Content-Length before it is read, or as it arrives when chunked)."""

    def __init__(self, app, limit: int, refuse) -> None:
        self.app, self.limit, self.refuse = app, limit, refuse

    def _error(self) -> JSONResponse:
        message = (
            f"the request body exceeds {self.limit:,} bytes (the server's --max-request-bytes)"
        )
        return self.refuse(p.APIError(413, message, code="request_too_large"))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._error()(scope, receive, send)
        if length is not None:  # the server reads no more than it says
            return await self.app(scope, receive, send)
        # chunked: read it here (the app would buffer it anyway), refusing past the limit
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._error()(scope, receive, send)
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)


def _replay(messages: list[dict], then=None):
    """An ASGI receive that gives `messages`, then waits on `then` (a disconnect)."""

    async def receive():
        if messages:
            return messages.pop(0)
        if then is None:
            return {"type": "http.disconnect"}
        return await then()

    return receive


@dataclasses.dataclass
class _Result:
    """What one request's stream brought: its text, tokens and log-probabilities."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None
    last: Delta | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.last = delta

    @property
    def cumulative_logprob(self) -> float:
        return sum(e.logprob for e in self.logprobs)


@dataclasses.dataclass
class _Choices:
    """How one HTTP request's streams become its choices: the API (`kind`), the body,
    its prompts (as given and as token ids) and the samples drawn per prompt."""

    kind: Literal["text", "chat"]
    body: object
    prompts: list
    token_lists: list[list[int]]
    samples: int
    tokenizer: object
    text_of: object
    prompt_logprobs: dict = dataclasses.field(default_factory=dict)  # group -> its first's

    def __post_init__(self) -> None:
        if self.body.return_tokens_as_token_ids:  # tokens named by id, not by their text
            self.text_of = _token_id_text

    def seen(self, index: int, result: _Result) -> None:
        """Keep a prompt's log-probabilities from its first sample's result."""
        if result.prompt_logprobs is not None and index % self.samples == 0:
            self.prompt_logprobs[index // self.samples] = result.prompt_logprobs

    @property
    def id_prefix(self) -> str:
        return "chatcmpl" if self.kind == "chat" else "cmpl"

    @property
    def n(self) -> int:
        return self.body.n

    def prompt_text(self, group: int) -> str:
        prompt = self.prompts[group]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def shows_logprobs(self) -> bool:
        if self.kind == "chat":
            return self.body.logprobs
        return self.body.logprobs is not None

    def logprobs(self, group: int, result: _Result, echo_prompt: bool, offset: int) -> dict | None:
        """The choice's `logprobs` object for the tokens in `result` (with the prompt's
        first when echo_prompt)."""
        if not self.shows_logprobs():
            return None
        if self.kind == "chat":
            return p.chat_logprobs(result.logprobs, self.text_of)
        token_ids, entries = list(result.token_ids), list(result.logprobs)
        if echo_prompt:  # the prompt's, as the group's first sample scored it
            token_ids = self.token_lists[group] + token_ids
            entries = list(self.prompt_logprobs[group] or []) + entries
        return p.completion_logprobs(token_ids, entries, self.text_of, offset)

    def whole(self, rid: str, model: str, results: list[_Result]) -> dict:
        """The non-streaming answer: the n likeliest of each prompt's samples."""
        choices = []
        echo = self.kind == "text" and self.body.echo
        for index, result in enumerate(results):
            self.seen(index, result)
        for group in range(len(self.prompts)):
            drawn = results[group * self.samples : (group + 1) * self.samples]
            kept = drawn
            if self.samples > self.n:  # best_of: the n with the highest log-probability
                kept = sorted(drawn, key=lambda r: -r.cumulative_logprob)[: self.n]
            for result in kept:
                index, finish = len(choices), result.last.finish_reason
                if self.kind == "chat":
                    logprobs = self.logprobs(group, result, False, 0)
                    choices.append(p.chat_choice(index, result.text, logprobs, finish))
                    continue
                prefix = self.prompt_text(group) if echo else ""
                logprobs = self.logprobs(group, result, echo, 0)
                choices.append(p.completion_choice(index, prefix + result.text, logprobs, finish))
        make = p.chat_object if self.kind == "chat" else p.completion_object
        return make(rid, model, choices, self.usage(results))

    def usage(self, results: list[_Result]) -> dict:
        lasts = [r.last for r in results]
        firsts = lasts[:: self.samples]  # each prompt's first sample
        shared = sum(d.cached_tokens for d in lasts) - sum(d.cached_tokens for d in firsts)
        return p.usage(
            sum(len(t) for t in self.token_lists),
            sum(d.completion_tokens for d in lasts),
            sum(d.cached_tokens for d in firsts),
            shared,
        )


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"


def _validation_error(exc: RequestValidationError) -> p.APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return p.APIError(400, f"the body is not valid JSON: {first.get('msg')}")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = loc[0] if loc else None  # the request field; deeper parts are pydantic's own path
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return p.APIError(400, message, param=field)


def _engine_failed(last: Delta) -> p.APIError:
    return p.APIError(500, f"the engine failed on this request: {last.error}", type="server_error")


async def _deltas(queue: asyncio.Queue, streams: list[RequestStream]) -> AsyncIterator[Delta]:
    """The deltas of an HTTP request's streams until all have finished; those of one
    stream that queued up while the client was being written to are merged into one
    (one SSE event instead of several when the server is busy)."""
    left = len(streams)
    while left:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        merged: dict[int, Delta] = {}
        for delta in batch:
            earlier = merged.get(delta.index)
            merged[delta.index] = delta if earlier is None else earlier.merged(delta)
        for delta in merged.values():
            if delta.finished:
                streams[delta.index].finished = True
                left -= 1
            yield delta


async def _collect(aengine: AsyncEngine, streams: list[RequestStream], request: Request):
    """Each stream's result, in order; aborts them all if the client goes away."""
    results = [_Result() for _ in streams]
    queue = streams[0].queue
    left = len(streams)
    getter: asyncio.Future | None = None
    try:
        while left:
            # one pending get() across polls, so no delta is lost to a timeout
            getter = getter or asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not done:
                if await request.is_disconnected():
                    raise p.APIError(499, "the client closed the connection")
                continue
            delta, getter = getter.result(), None
            results[delta.index].add(delta)
            if delta.finished:
                streams[delta.index].finished = True
                left -= 1
                if delta.error:
                    raise _engine_failed(delta)
        return results
    finally:
        if getter is not None:
            getter.cancel()
        for stream in streams:
            aengine.done(stream)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(aengine: AsyncEngine, view: _Choices, streams: list[RequestStream],
                  model: str) -> AsyncIterator[str]:  # fmt: skip
    """The server-sent events of a streaming request (n choices, no best_of)."""
    rid = p.new_id(view.id_prefix)
    body = view.body
    results = [_Result() for _ in streams]
    offsets = [0] * len(streams)  # characters sent per choice (text_offset)
    started = [False] * len(streams)
    try:
        if view.kind == "chat":
            for index in range(len(streams)):
                role = {"role": "assistant", "content": ""}
                yield _sse(p.chat_chunk(rid, model, index, role, None))
        async for delta in _deltas(streams[0].queue, streams):
            index = delta.index
            if delta.error:
                yield _sse(_engine_failed(delta).body())
                break
            result = _Result()
            result.add(delta)
            results[index].add(delta)
            view.seen(index, results[index])
            finish = delta.finish_reason if delta.finished else None
            if view.kind == "chat":
                logprobs = view.logprobs(0, result, False, 0) if result.logprobs else None
                if delta.text or logprobs:
                    content = {"content": delta.text}
                    yield _sse(p.chat_chunk(rid, model, index, content, None, logprobs))
                if delta.finished:
                    yield _sse(p.chat_chunk(rid, model, index, {}, delta.finish_reason))
                continue
            group = index // view.samples
            echo = body.echo and not started[index]
            text = (view.prompt_text(group) if echo else "") + delta.text
            logprobs = view.logprobs(group, result, echo, offsets[index])
            started[index] = True
            if logprobs is not None:
                offsets[index] += sum(len(token) for token in logprobs["tokens"])
            choice = p.completion_choice(index, text, logprobs, finish)
            yield _sse(p.completion_object(rid, model, [choice], None))
        else:
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse(p.usage_chunk(rid, model, view.kind, view.usage(results)))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream (the generator is cancelled)
        for stream in streams:
            aengine.done(stream)
