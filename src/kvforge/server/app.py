"""The OpenAI-compatible HTTP API over one engine (FastAPI; run it with uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both stream with
server-sent events when `stream` is true), GET /v1/models, GET /health,
GET /metrics (Prometheus text). Every error is an OpenAI error object:
400 for a request that is malformed or can never run (naming the limit),
401 without the API key, 429 when the server already holds
max_num_seqs + max_queue requests, 500 if the engine failed on a request.
A request whose client goes away is aborted and its KV blocks are freed.
"""

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvforge.chat_template import chat_prompt
from kvforge.errors import KVForgeError
from kvforge.server import protocol as p
from kvforge.server.async_engine import AsyncEngine, Delta, RequestStream
from kvforge.server.metrics import ServerMetrics

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is there


def build_app(llm, model_name: str, api_key: str | None = None, max_queue: int = 256) -> FastAPI:
    """The API over `llm` (a kvforge.LLM); the engine thread runs while the app is up."""
    engine = llm.engine
    metrics = ServerMetrics(engine)
    max_requests = engine.scheduler.config.max_num_seqs + max_queue
    aengine = AsyncEngine(engine, metrics, max_requests)

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

    def check_model(name: str) -> None:
        if name != model_name:
            raise p.APIError(
                400,
                f"model {name!r} is not served here; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def submit(token_ids: list[int], params, body) -> RequestStream:
        if aengine.num_active >= aengine.max_requests:
            raise p.APIError(
                429,
                f"the server is full: {aengine.num_active} requests running or waiting "
                f"(max_num_seqs + max_queue = {aengine.max_requests}); retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        try:
            return aengine.submit(token_ids, params, body.cache_salt, body.kv_policy_choice())
        except KVForgeError as exc:
            raise p.APIError(400, str(exc)) from None

    def tokenize(prompt: str | list[int]) -> list[int]:
        try:
            return engine.tokenize(prompt)[1]
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

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "kvforge",
            "max_model_len": engine.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: p.CompletionRequest, request: Request):
        check_model(body.model)
        max_tokens = p.COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        params = body.sampling_params(max_tokens)
        token_ids = await asyncio.to_thread(tokenize, body.prompt)
        stream = submit(token_ids, params, body)
        return await respond("text", body, stream, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        check_model(body.model)
        prompt = await asyncio.to_thread(
            chat_prompt, engine.tokenizer, [m.as_dict() for m in body.messages]
        )
        token_ids = await asyncio.to_thread(tokenize, prompt)  # off the event loop: long
        # prompts take a while to tokenize, and other requests' streams must not wait
        max_tokens = body.max_tokens
        if body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:  # as much as the context and the pool leave
            max_tokens = engine.max_request_tokens - len(token_ids)
            if max_tokens <= 0:
                raise p.APIError(
                    400,
                    f"the messages take {len(token_ids)} tokens; a request may have at most "
                    f"{engine.max_request_tokens} (the model's context and the KV pool)",
                    param="messages",
                )
        params = body.sampling_params(max_tokens)
        stream = submit(token_ids, params, body)
        return await respond("chat", body, stream, request)

    async def respond(kind: str, body, stream: RequestStream, request: Request):
        """Server-sent events when the body asks to stream, else one JSON object."""
        rid = p.new_id("chatcmpl" if kind == "chat" else "cmpl")
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunker = _chat_chunks if kind == "chat" else _completion_chunks
            chunks = chunker(aengine, stream, rid, model_name, usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        text, last = await _collect(aengine, stream, request)
        make = p.chat_object if kind == "chat" else p.completion_object
        return make(rid, model_name, text, last.finish_reason, _usage(last))

    return app


def _validation_error(exc: RequestValidationError) -> p.APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return p.APIError(400, f"the body is not valid JSON: {first.get('msg')}")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    field = loc[0] if loc else None  # the request field; deeper parts are pydantic's own path
    message = f"{field}: {first.get('msg')}" if field else str(first.get("msg"))
    return p.APIError(400, message, param=field)


def _usage(last: Delta) -> dict:
    return p.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)


def _engine_failed(last: Delta) -> p.APIError:
    return p.APIError(500, f"the engine failed on this request: {last.error}", type="server_error")


async def _deltas(stream: RequestStream) -> AsyncIterator[Delta]:
    """The stream's deltas; those that queued up while the client was being written to
    are merged into one (one SSE event instead of several when the server is busy)."""
    while True:
        delta = await stream.queue.get()
        while not delta.finished and not stream.queue.empty():
            later = stream.queue.get_nowait()
            delta = dataclasses.replace(later, text=delta.text + later.text)
        if delta.finished:
            stream.finished = True
        yield delta
        if delta.finished:
            return


async def _collect(aengine: AsyncEngine, stream: RequestStream, request: Request):
    """The whole text and the last delta; aborts the request if the client goes away."""
    parts: list[str] = []
    getter: asyncio.Future | None = None
    try:
        while True:
            # one pending get() across polls, so no delta is lost to a timeout
            getter = getter or asyncio.ensure_future(stream.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not done:
                if await request.is_disconnected():
                    raise p.APIError(499, "the client closed the connection")
                continue
            delta, getter = getter.result(), None
            parts.append(delta.text)
            if delta.finished:
                stream.finished = True
                if delta.error:
                    raise _engine_failed(delta)
                return "".join(parts), delta
    finally:
        if getter is not None:
            getter.cancel()
        aengine.done(stream)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _completion_chunks(aengine, stream, rid, model, include_usage) -> AsyncIterator[str]:
    try:
        async for delta in _deltas(stream):
            if delta.error:
                yield _sse(_engine_failed(delta).body())
                break
            finish = delta.finish_reason if delta.finished else None
            yield _sse(p.completion_object(rid, model, delta.text, finish, None))
            if delta.finished and include_usage:
                yield _sse(p.usage_chunk(rid, model, "text", _usage(delta)))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream (the generator is cancelled)
        aengine.done(stream)


async def _chat_chunks(aengine, stream, rid, model, include_usage) -> AsyncIterator[str]:
    try:
        yield _sse(p.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        async for delta in _deltas(stream):
            if delta.error:
                yield _sse(_engine_failed(delta).body())
                break
            if delta.text:
                yield _sse(p.chat_chunk(rid, model, {"content": delta.text}, None))
            if delta.finished:
                yield _sse(p.chat_chunk(rid, model, {}, delta.finish_reason))
                if include_usage:
                    yield _sse(p.usage_chunk(rid, model, "chat", _usage(delta)))
        yield "data: [DONE]\n\n"
    finally:
        aengine.done(stream)
