"""`kvforge serve`'s engine process: the engine loop on its own, fed by the API server
process over two local ZeroMQ sockets (as vLLM's engine core is).

    API server process                          engine process
    EngineProcess ── PUSH ipc://…/in ──────────▶ PULL: AddCommand, abort id, "stop"
                  ◀─ PULL ipc://…/out ───────── PUSH: "ready" (tokenizer, limits),
                                                 then one message a step:
                                                 ("deltas", [(id, Delta)], gauges)

Why ZeroMQ: its sockets never block the event loop (`zmq.asyncio`), a message is one
frame whatever its size, and the engine process can die without leaving the server
stuck on a half-read pipe. Messages are pickled: both ends are one program, and
`SamplingParams`, policies and log-probabilities cross as they are.

The engine process owns the model, the KV cache and every engine decision; the server
process parses HTTP and JSON, tokenizes, renders chat templates and writes the SSE
streams, so none of that shares the GIL with a forward pass. If the engine process
dies, its requests fail with a 500, /health answers 503 and the server exits (code 1).
"""

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import sys
import tempfile
import threading
import time

import zmq
import zmq.asyncio

from kvforge.errors import EngineDeadError, KVForgeError
from kvforge.server.async_engine import AddCommand, Delta, EngineLoop, StreamFront
from kvforge.server.metrics import ServerMetrics, engine_gauges

STARTUP_TIMEOUT_S = 600  # loading a large model on a slow disk
DEATH_POLL_S = 0.2  # how often the server checks that the engine process is alive


def _core_main(llm_kwargs: dict, in_addr: str, out_addr: str, torch_threads: int | None):
    """The engine process: build the engine, report, then run the loop until told to stop."""
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    context = zmq.Context()
    out = context.socket(zmq.PUSH)
    out.connect(out_addr)
    inbox = context.socket(zmq.PULL)
    inbox.connect(in_addr)
    try:
        from kvforge.llm import LLM

        llm = LLM(**llm_kwargs)
    except KVForgeError as exc:
        out.send(pickle.dumps(("failed", str(exc))))
        return
    engine = llm.engine
    ready = ("ready", engine.tokenizer, engine.limits, engine.scheduler.config.max_num_seqs,
             llm.model_name, engine_gauges(engine))  # fmt: skip
    out.send(pickle.dumps(ready))

    def deliver(deltas: list[tuple[str, Delta]]) -> None:
        message = ("deltas", deltas, engine_gauges(engine))
        out.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def send_snapshot(snapshot: dict) -> None:
        out.send(pickle.dumps(("snapshot", snapshot), protocol=pickle.HIGHEST_PROTOCOL))

    loop = EngineLoop(engine, deliver, send_snapshot)

    def receive() -> None:  # the inbox's own thread: commands reach the loop between steps
        while True:
            command = pickle.loads(inbox.recv())
            if command == "stop":
                loop.stop()
                return
            if isinstance(command, AddCommand):
                loop.add(command)
            elif isinstance(command, tuple) and command[0] == "snapshot":
                loop.request_snapshot(command[1])
            else:
                loop.abort(command)

    threading.Thread(target=receive, name="kvforge-inbox", daemon=True).start()
    try:
        loop.run()
    except EngineDeadError as exc:  # its requests have been told; the server sees us go
        out.close(linger=1000)
        print(f"kvforge serve: the engine stopped: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    llm.close()
    out.close(linger=1000)


class EngineProcess(StreamFront):
    """The server's handle on the engine process: starts it (and waits until the model is
    loaded), sends it requests and aborts, and dispatches its deltas to the streams."""

    def __init__(self, llm_kwargs: dict, max_queue: int, torch_threads: int | None = None):
        self._dir = tempfile.mkdtemp(prefix="kvforge-")
        self._in_addr = f"ipc://{self._dir}/in"
        self._out_addr = f"ipc://{self._dir}/out"
        self._context = zmq.asyncio.Context()
        self._outbox = self._context.socket(zmq.PUSH)  # to the engine
        self._outbox.bind(self._in_addr)
        self._inbox = self._context.socket(zmq.PULL)  # from the engine
        self._inbox.bind(self._out_addr)
        spawn = multiprocessing.get_context("spawn")
        self.process = spawn.Process(
            target=_core_main, args=(llm_kwargs, self._in_addr, self._out_addr, torch_threads),
            name="kvforge-engine", daemon=True,
        )  # fmt: skip
        self.process.start()
        self.exit_code: int | None = None  # set when the engine process died under us
        self.on_death = None  # called (on the event loop) when it does
        self._tasks: list[asyncio.Task] = []
        first = self._wait_ready()
        _, self.tokenizer, self.limits, max_num_seqs, self.model_name, self.gauges_now = first
        super().__init__(ServerMetrics(lambda: self.gauges_now), max_num_seqs + max_queue)
        self.max_num_seqs = max_num_seqs

    def _wait_ready(self) -> tuple:
        """The engine's "ready" report; KVForgeError if it failed to start."""
        inbox = zmq.Socket.shadow(self._inbox.underlying)  # a blocking view: no loop yet
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not inbox.poll(timeout=200):
            if not self.process.is_alive():
                raise KVForgeError(
                    f"the engine process exited with code {self.process.exitcode} "
                    "while loading the model"
                )
            if time.monotonic() > deadline:
                self.process.kill()
                raise KVForgeError(f"the engine did not start in {STARTUP_TIMEOUT_S} s")
        message = pickle.loads(inbox.recv())
        if message[0] == "failed":
            self.process.join(timeout=10)
            raise KVForgeError(message[1])
        return message

    # --- on the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._receive()),
                       asyncio.ensure_future(self._watch())]  # fmt: skip

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.process.is_alive():
            self._outbox.send(pickle.dumps("stop"))
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5)
        self._outbox.close(linger=0)
        self._inbox.close(linger=0)
        self._context.term()
        for name in ("in", "out"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)

    @property
    def alive(self) -> bool:
        return self.exit_code is None and self.process.is_alive()

    def _send(self, command) -> None:
        if not self.alive:
            raise KVForgeError("the engine process is not running")
        self._outbox.send(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_add(self, command: AddCommand) -> None:
        self._send(command)

    def _send_abort(self, request_id: str) -> None:
        if self.alive:
            self._send(request_id)

    def _send_snapshot(self, show_text: bool) -> None:
        self._send(("snapshot", show_text))

    async def _receive(self) -> None:
        while True:
            message = pickle.loads(await self._inbox.recv())
            if message[0] == "snapshot":
                self._snapshot_ready(message[1])
                continue
            _, deltas, gauges = message
            self.gauges_now = gauges
            if deltas:
                self._dispatch(deltas)

    async def _watch(self) -> None:
        """Notice the engine process dying: fail its requests, then tell the server."""
        while self.process.is_alive():
            await asyncio.sleep(DEATH_POLL_S)
        self.exit_code = self.process.exitcode
        self._fail_all(f"the engine process died (exit code {self.exit_code})")
        if self.on_death is not None:
            self.on_death()
