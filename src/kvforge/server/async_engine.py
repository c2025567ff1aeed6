"""The engine loop and the asyncio side that HTTP handlers talk to.

`EngineLoop` runs the engine: commands in (add, abort), one step at a time, and after
each step one batch of deltas out — every request's new text and tokens. It runs either
on a thread of the server's own process (`AsyncEngine`, for `build_app(llm)`: tests and
embedding) or as the main loop of the engine process (`engine_core`, what `kvforge
serve` runs), where HTTP, JSON and SSE never share the GIL with it.

    handlers (event loop)                  engine loop (thread or process)
    submit() ──add / abort──────────────▶  add_request / abort, between steps
                                           step() … step() …
    RequestStream.queue ◀── deltas ──────  one batch a step

Only the loop touches the engine's requests, scheduler and pool. A request is
validated (`RequestLimits.check`) before it is queued, so a bad request is refused with
a 400 and never reaches the loop.
"""

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvforge.engine.engine import LLMEngine
from kvforge.engine.request import Request, Status
from kvforge.engine.sampling import SamplingParams, TokenLogprobs
from kvforge.errors import EngineDeadError, KVForgeError
from kvforge.kvcache.policy import KVPolicy
from kvforge.server.inspect import KVInspector
from kvforge.server.metrics import ServerMetrics


@dataclass(frozen=True)
class Delta:
    """New text and tokens of one request since the last delta; the last one has
    `finished` set. `index`: the request's choice in its HTTP request."""

    text: str
    index: int = 0
    token_ids: tuple[int, ...] = ()  # the new output tokens (text may lag: stable_text)
    logprobs: tuple[TokenLogprobs, ...] = ()  # theirs, when asked
    prompt_logprobs: list | None = None  # once, in the first delta, when asked
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    queue_s: float | None = None  # the last delta: arrival to first scheduled, in the engine

    def merged(self, later: "Delta") -> "Delta":
        """This delta and a later one of the same request, as one."""
        return dataclasses.replace(
            later,
            text=self.text + later.text,
            token_ids=self.token_ids + later.token_ids,
            logprobs=self.logprobs + later.logprobs,
            prompt_logprobs=self.prompt_logprobs or later.prompt_logprobs,
        )


@dataclass
class RequestStream:
    """The asyncio side of one request: its deltas arrive on `queue`, which the choices
    of one HTTP request share (each delta names its `index`)."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0
    finished: bool = False
    arrival_s: float = field(default_factory=time.perf_counter)
    last_token_s: float | None = None


@dataclass(frozen=True)
class AddCommand:
    """A request for the loop (picklable: it crosses to the engine process)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    index: int = 0
    cache_salt: str | None = None
    kv_policy: KVPolicy | None = None
    after: str | None = None  # start once this request has computed its prompt


@dataclass
class _Tracked:
    """Loop-side state of one request: how much text and how many tokens it has sent."""

    request: Request
    index: int
    sent: int = 0  # characters of text already sent
    sent_tokens: int = 0  # output tokens already sent
    sent_prompt_logprobs: bool = False


Deliver = Callable[[list[tuple[str, Delta]]], None]


class EngineLoop:
    """Runs `LLMEngine` steps, taking commands between them and handing every step's
    deltas, as (request id, Delta), to `deliver` (called after each step, and after
    each wait while idle with an empty list)."""

    def __init__(self, engine: LLMEngine, deliver: Deliver, on_snapshot=None) -> None:
        """`on_snapshot(snapshot)`: called on the loop's thread, between steps, with the
        KV cache snapshot `request_snapshot` asked for (`server.inspect`)."""
        self.engine = engine
        self.deliver = deliver
        self.on_snapshot = on_snapshot
        self._snapshot: bool | None = None  # asked for: with the requests' text or not
        self._inspector: KVInspector | None = None  # made at the first snapshot asked for
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._tracked: dict[str, _Tracked] = {}
        self._waiting: list[AddCommand] = []  # adds waiting on a sibling's prefill

    # --- any thread -----------------------------------------------------------------

    def add(self, command: AddCommand) -> None:
        self._commands.put(command)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._commands.put(request_id)
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def request_snapshot(self, show_text: bool = False) -> None:
        """Have `on_snapshot` called with the cache's snapshot before the next step."""
        self._snapshot = bool(self._snapshot) or show_text
        self._wake.set()

    # --- the loop -------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if self._snapshot is not None and self.on_snapshot is not None:
                show_text, self._snapshot = self._snapshot, None
                self._inspector = self._inspector or KVInspector(self.engine)
                self.on_snapshot(self._inspector.snapshot(show_text))
            self._start_waiting()
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                self.deliver([])
                continue
            # on an error the engine ends the batch's requests (with their error) and
            # _publish tells their clients; the loop keeps serving the rest, unless the
            # engine cannot run another step (a tensor-parallel rank is gone)
            try:
                self.engine.step()
            except EngineDeadError as exc:
                self._end_all(str(exc))
                raise
            except Exception:
                pass
            self._publish()

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, AddCommand):
                self._waiting.append(command)
            else:
                self._abort(command)

    def _start_waiting(self) -> None:
        """Add the queued requests whose `after` request has computed its prompt (or
        ended: then it is no longer tracked); the others wait another step."""
        waiting, self._waiting = self._waiting, []
        out: list[tuple[str, Delta]] = []
        for command in waiting:
            tracked = self._tracked.get(command.after) if command.after else None
            r = tracked.request if tracked is not None else None
            if r is not None and not r.output_token_ids and r.status is not Status.FINISHED:
                self._waiting.append(command)
                continue
            refused = self._add(command)
            if refused is not None:
                out.append(refused)
        if out:
            self.deliver(out)

    def _add(self, c: AddCommand) -> tuple[str, Delta] | None:
        try:
            request = self.engine.add_request(
                c.token_ids, c.params, request_id=c.request_id, cache_salt=c.cache_salt,
                kv_policy=c.kv_policy,
            )  # fmt: skip
        except KVForgeError as exc:
            return c.request_id, Delta("", c.index, finished=True, finish_reason="error",
                                       error=str(exc))  # fmt: skip
        self._tracked[c.request_id] = _Tracked(request, c.index)
        return None

    def _abort(self, request_id: str) -> None:
        self._waiting = [c for c in self._waiting if c.request_id != request_id]
        if self._tracked.pop(request_id, None) is not None:  # else it has ended already
            self.engine.abort(request_id)

    def _end_all(self, error: str) -> None:
        """The engine cannot go on: every request still tracked or queued ends with `error`
        (the failed batch's own, with theirs)."""
        self._publish()
        ended = [(rid, t.index) for rid, t in self._tracked.items()]
        ended += [(c.request_id, c.index) for c in self._waiting]
        self._tracked.clear()
        self._waiting.clear()
        self.deliver([(rid, Delta("", index, finished=True, finish_reason="error", error=error))
                      for rid, index in ended])  # fmt: skip

    def _publish(self) -> None:
        """Each request's new text and tokens; finished requests get their last delta."""
        out: list[tuple[str, Delta]] = []
        for request_id, tracked in list(self._tracked.items()):
            r = tracked.request
            finished = r.status is Status.FINISHED
            text = self.engine.stable_text(r)  # never a character later tokens could change
            new = text[tracked.sent :]
            new_tokens = tuple(r.output_token_ids[tracked.sent_tokens :])
            if not new and not new_tokens and not finished:
                continue
            logprobs = ()
            if r.logprobs is not None:
                logprobs = tuple(r.logprobs[tracked.sent_tokens :])
            prompt_logprobs = None
            if r.prompt_logprobs is not None and not tracked.sent_prompt_logprobs:
                prompt_logprobs, tracked.sent_prompt_logprobs = r.prompt_logprobs, True
            tracked.sent += len(new)
            tracked.sent_tokens += len(new_tokens)
            delta = Delta(new, tracked.index, new_tokens, logprobs, prompt_logprobs)
            if finished:
                del self._tracked[request_id]
                m = r.metrics
                delta = dataclasses.replace(
                    delta,
                    finished=True,
                    finish_reason="error" if r.error else r.finish_reason,
                    error=r.error,
                    prompt_tokens=m.prompt_tokens,
                    completion_tokens=len(r.output_token_ids),
                    cached_tokens=m.cached_tokens,
                    queue_s=None if m.scheduled_s is None else m.scheduled_s - m.arrival_s,
                )
            out.append((request_id, delta))
        self.deliver(out)


class StreamFront:
    """The event-loop side of an engine loop, wherever it runs: request streams by id,
    how many requests are active (submitted and not yet ended), the deltas dispatched to
    their streams and counted in the metrics. Subclasses send the commands."""

    def __init__(self, metrics: ServerMetrics, max_requests: int) -> None:
        self.metrics = metrics
        self.max_requests = max_requests  # running + waiting; one more is refused (429)
        self.num_active = 0
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._snapshots: list[asyncio.Future] = []  # /debug/kv callers waiting

    async def snapshot(self, show_text: bool = False, timeout_s: float = 10.0) -> dict:
        """The KV cache's snapshot (`server.inspect`), taken between two engine steps."""
        waiter = asyncio.get_running_loop().create_future()
        self._snapshots.append(waiter)
        self._send_snapshot(show_text)
        return await asyncio.wait_for(waiter, timeout_s)

    def _snapshot_ready(self, snapshot: dict) -> None:  # on the event loop
        waiters, self._snapshots = self._snapshots, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(snapshot)

    def _send_snapshot(self, show_text: bool) -> None:
        raise NotImplementedError

    def _send_add(self, command: AddCommand) -> None:
        raise NotImplementedError

    def _send_abort(self, request_id: str) -> None:
        raise NotImplementedError

    def submit(
        self,
        token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        kv_policy: KVPolicy | None = None,
        index: int = 0,
        queue: asyncio.Queue | None = None,
        after: RequestStream | None = None,
    ) -> RequestStream:
        """Queue a validated request; its deltas arrive on the returned stream (on `queue`
        if given, shared by the choices of one HTTP request). With `after` (a sibling sample
        of the same prompt), it starts once that request's prompt is computed, so that its
        full blocks come from the prefix cache rather than a second prefill."""
        loop = asyncio.get_running_loop()
        stream = RequestStream(f"srv-{next(self._ids)}", loop, queue or asyncio.Queue(), index)
        self._streams[stream.request_id] = stream
        self.num_active += 1
        self.metrics.prompt_tokens.inc(len(token_ids))
        after_id = after.request_id if after is not None else None
        self._send_add(AddCommand(stream.request_id, token_ids, params, index, cache_salt,
                                  kv_policy, after_id))  # fmt: skip
        return stream

    def done(self, stream: RequestStream) -> None:
        """The handler is finished with this stream (complete, failed or disconnected):
        abort it if the engine is still working on it."""
        if self._streams.pop(stream.request_id, None) is not None:
            self.num_active -= 1
        if not stream.finished:
            stream.finished = True
            self._send_abort(stream.request_id)

    def _dispatch(self, deltas: list[tuple[str, Delta]]) -> None:  # on the event loop
        now = time.perf_counter()
        for request_id, delta in deltas:
            stream = self._streams.get(request_id)
            if stream is None:  # its handler is gone (disconnected, aborted)
                continue
            for _ in delta.token_ids:
                self._observe_token(stream, now)
            if delta.finished:
                del self._streams[request_id]
                self.num_active -= 1
                self.metrics.e2e.observe(now - stream.arrival_s)
                if delta.queue_s is not None:
                    self.metrics.queue_time.observe(delta.queue_s)
            stream.queue.put_nowait(delta)

    def _observe_token(self, stream: RequestStream, now: float) -> None:
        self.metrics.generation_tokens.inc()
        if stream.last_token_s is None:
            self.metrics.ttft.observe(now - stream.arrival_s)
        else:
            self.metrics.itl.observe(now - stream.last_token_s)
        stream.last_token_s = now

    def _fail_all(self, error: str) -> None:
        """End every active stream with `error` (the engine is gone)."""
        ended = Delta("", finished=True, finish_reason="error", error=error)
        self._dispatch([(rid, dataclasses.replace(ended, index=stream.index))
                        for rid, stream in list(self._streams.items())])  # fmt: skip


class AsyncEngine(StreamFront):
    """The engine loop on a thread of this process, while the event loop serves HTTP."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_requests: int) -> None:
        super().__init__(metrics, max_requests)
        self.engine = engine
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._loop = EngineLoop(engine, self._deliver, self._on_snapshot)
        self._thread = threading.Thread(target=self._loop.run, name="kvforge-engine", daemon=True)

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        self._loop.stop()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _send_add(self, command: AddCommand) -> None:
        self._loop.add(command)

    def _send_abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def _send_snapshot(self, show_text: bool) -> None:
        self._loop.request_snapshot(show_text)

    def _on_snapshot(self, snapshot: dict) -> None:  # on the engine thread
        self._event_loop.call_soon_threadsafe(self._snapshot_ready, snapshot)

    def _deliver(self, deltas: list[tuple[str, Delta]]) -> None:  # on the engine thread
        if deltas:  # one wake-up of the event loop per step carries every delta
            self._event_loop.call_soon_threadsafe(self._dispatch, deltas)
