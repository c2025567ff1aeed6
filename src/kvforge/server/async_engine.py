"""The engine loop on its own thread, feeding asyncio queues that HTTP handlers read.

    handlers (event loop)              engine thread
    submit() ──commands──────────────▶ add_request / abort, between steps
                                       step() … step() … (the GIL is released in
    RequestStream.queue ◀── deltas ─── the model's kernels, so handlers run on)

Only the engine thread touches the engine's requests, scheduler and pool;
handlers only read counters (for /metrics) and call `check_request`, which
reads fixed limits. A request is validated before it is queued, so a bad
request is refused with a 400 and never reaches the loop.
"""

import asyncio
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from kvforge.engine.engine import LLMEngine
from kvforge.engine.request import Request, Status
from kvforge.engine.sampling import SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.policy import KVPolicy
from kvforge.server.metrics import ServerMetrics


@dataclass(frozen=True)
class Delta:
    """New text of one request since the last delta; the last one has `finished` set."""

    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class RequestStream:
    """The asyncio side of one request: its deltas arrive on `queue`."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finished: bool = False

    def put(self, delta: Delta) -> None:  # called from the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)


def _deliver(deltas: list[tuple[RequestStream, Delta]]) -> None:  # on the event loop
    for stream, delta in deltas:
        stream.queue.put_nowait(delta)


@dataclass
class _Tracked:
    """Engine-thread state of one request: how much text it has sent, when its last token came."""

    request: Request
    stream: RequestStream
    sent: int = 0  # characters of text already sent
    last_token_s: float | None = None


class AsyncEngine:
    """Runs `LLMEngine` steps on a background thread while the event loop serves HTTP."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_requests: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_requests = max_requests  # running + waiting; one more is refused (429)
        # submitted and not yet ended by the engine thread (finished, aborted or refused):
        # counted there, so a handler that never runs its cleanup cannot leak a slot
        self.num_active = 0
        self._count_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="kvforge-engine", daemon=True)

    # --- event-loop side ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(
        self,
        token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        kv_policy: KVPolicy | None = None,
    ) -> RequestStream:
        """Queue a validated request; its deltas arrive on the returned stream."""
        self.engine.check_request(token_ids, params, kv_policy or self.engine.kv_policy)
        stream = RequestStream(f"srv-{next(self._ids)}", asyncio.get_running_loop())
        with self._count_lock:
            self.num_active += 1
        self._commands.put(("add", stream, token_ids, params, cache_salt, kv_policy))
        self._wake.set()
        return stream

    def done(self, stream: RequestStream) -> None:
        """The handler is finished with this stream (complete, failed or disconnected):
        abort it if the engine is still working on it."""
        if not stream.finished:
            stream.finished = True
            self._commands.put(("abort", stream.request_id))
            self._wake.set()

    # --- engine thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception:  # the engine ended the batch's requests (with their error)
                events = []  # and _publish tells their clients; keep serving the rest
            now = time.perf_counter()
            for event in events:
                tracked = self._tracked.get(event.request.request_id)
                if tracked is not None and event.token_id is not None:
                    self._observe_token(tracked, now)
            self._publish()

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                self._add(*command[1:])
            else:
                self._abort(command[1])

    def _ended(self) -> None:
        with self._count_lock:
            self.num_active -= 1

    def _add(
        self,
        stream: RequestStream,
        token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        kv_policy: KVPolicy | None = None,
    ) -> None:
        if stream.finished:  # the client left before the request reached the engine
            self._ended()
            return
        try:
            request = self.engine.add_request(
                token_ids, params, request_id=stream.request_id, cache_salt=cache_salt,
                kv_policy=kv_policy,
            )  # fmt: skip
        except KVForgeError as exc:
            self._ended()
            stream.put(Delta("", finished=True, finish_reason="error", error=str(exc)))
            return
        self._tracked[stream.request_id] = _Tracked(request, stream)
        self.metrics.prompt_tokens.inc(len(token_ids))

    def _abort(self, request_id: str) -> None:
        if self._tracked.pop(request_id, None) is not None:  # else it has ended already
            self.engine.abort(request_id)
            self._ended()

    def _observe_token(self, tracked: _Tracked, now: float) -> None:
        self.metrics.generation_tokens.inc()
        m = tracked.request.metrics
        if tracked.last_token_s is None:
            self.metrics.ttft.observe(now - m.arrival_s)
        else:
            self.metrics.itl.observe(now - tracked.last_token_s)
        tracked.last_token_s = now

    def _publish(self) -> None:
        """Send each request's new text; finished requests get their last delta. One wake-up
        of the event loop per step carries every request's delta."""
        out: list[tuple[RequestStream, Delta]] = []
        for request_id, tracked in list(self._tracked.items()):
            r = tracked.request
            finished = r.status is Status.FINISHED
            text = self.engine.stable_text(r)  # never a character later tokens could change
            new = text[tracked.sent :]
            if not new and not finished:
                continue
            tracked.sent += len(new)
            if not finished:
                out.append((tracked.stream, Delta(new)))
                continue
            del self._tracked[request_id]
            self._ended()
            m = r.metrics
            final = Delta(
                new,
                finished=True,
                finish_reason="error" if r.error else r.finish_reason,
                error=r.error,
                prompt_tokens=m.prompt_tokens,
                completion_tokens=len(r.output_token_ids),
                cached_tokens=m.cached_tokens,
            )
            out.append((tracked.stream, final))
        if out:
            out[0][0].loop.call_soon_threadsafe(_deliver, out)
