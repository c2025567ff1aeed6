"""Tensor parallelism over torch.distributed: the group of ranks one engine runs on.

Rank 0 is the engine: it owns the block pool, the block tables, the prefix cache, the
tiers and the scheduler, samples, and sends each rank its `worker.Plan` once a step.
Every rank (rank 0 included) holds its share of each layer (`models.tensor_parallel`)
and a KV store of its heads only, with the same block ids: one pool's decision is
carried out by every rank on its own bytes.

How the ranks start:
    one machine   `LLM(tensor_parallel_size=N)` starts ranks 1..N-1 itself, as
                  `python -m kvforge.engine.parallel` processes, on loopback; on a CPU
                  the cores are split between them (torch threads).
    torchrun      every process runs the same kvforge command; torchrun's RANK,
                  WORLD_SIZE, MASTER_ADDR and MASTER_PORT say where: rank 0 becomes
                  the engine (and the server), the others serve it until it stops
                  (`kvforge.cli` calls `run_worker`). docs/tensor-parallel.md has the
                  commands for several machines.

Two process groups, both torch.distributed: gloo for plans, gathers and setup (CPU
tensors and objects), and the all-reduces of the forward pass on the device's own
backend (nccl with one GPU per rank; gloo on a CPU, or with several ranks on one GPU).
No transport of our own.

A rank that dies closes its connections: the collective rank 0 is in fails at once,
the group is shut (every other rank stopped and reaped) and the engine raises
`EngineDeadError` naming the rank and its exit code; later steps raise it too.
"""

import argparse
import contextlib
import dataclasses
import datetime
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kvforge.errors import EngineDeadError, KVForgeError
from kvforge.kvcache import block_ops as ops

STEP_TIMEOUT = datetime.timedelta(minutes=5)  # one collective within a step
IDLE_TIMEOUT = datetime.timedelta(days=365)  # a rank waiting for its next plan
STOP_WAIT_S = 10.0


class Comm:
    """What a rank's model and worker need of the group: the all-reduce of row-parallel
    matmuls, and gathers to rank 0."""

    def __init__(self, rank: int, size: int, device_group, step_group) -> None:
        self.rank, self.size = rank, size
        self.device_group, self.step_group = device_group, step_group
        # seconds in all-reduces (the wait for the slowest rank included), and calls:
        # what benchmarks/tensor_parallel.py reports against the step
        self.reduce_s, self.reduces = 0.0, 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        start = time.perf_counter()
        if tensor.device.type == "cuda" and self.device_group is None:  # gloo: via the host
            host = tensor.cpu()
            dist.all_reduce(host, group=self.step_group)
            tensor.copy_(host)
        else:
            dist.all_reduce(tensor, group=self.device_group or self.step_group)
        self.reduce_s += time.perf_counter() - start
        self.reduces += 1

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape and dtype), on the host, at rank 0."""
        tensor = tensor.detach().contiguous().cpu()
        parts = [torch.empty_like(tensor) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(tensor, parts, dst=0, group=self.step_group)
        return parts

    def gather_object(self, obj: Any, group=None) -> list[Any] | None:
        out = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=group or self.step_group)
        return out


@dataclass(frozen=True)
class Launch:
    """What rank 0 tells every rank first: the engine's config (the model to load),
    and how the ranks are laid out."""

    config: Any  # EngineConfig
    size: int
    device_type: str
    nccl: bool
    threads: int | None  # torch threads of each rank (None: as started)
    first_device: int = 0  # rank 0's CUDA device; rank r started here takes the r-th after it


@dataclass(frozen=True)
class StoreLayout:
    """The KV store every rank allocates: its share of the heads, the same blocks."""

    spec: Any  # planner.rank_spec
    fmt: Any  # KVFormat
    num_blocks: int
    block_size: int
    kv_replicas: int  # ranks that store each KV head


def _for_rank(plan, rank: int):
    """`plan` as rank `rank` runs it: blocks loaded from a tier cut to its share."""
    if not any(isinstance(op, ops.LoadBlocks) for op in plan.ops):
        return plan
    cut = [  # copies: a view would carry every rank's bytes when pickled
        ops.LoadBlocks(op.block_ids, [c[rank].clone() for c in op.contents])
        if isinstance(op, ops.LoadBlocks)
        else op
        for op in plan.ops
    ]
    return dataclasses.replace(plan, ops=cut)


class TensorParallelGroup:
    """Rank 0's side of the group: sends plans, gathers, stops the other ranks."""

    def __init__(self, size: int, processes: list[subprocess.Popen], launch: Launch) -> None:
        self.size = size
        self.processes = processes  # ranks 1.. when started here (empty under torchrun)
        self.launch = launch
        self.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        self.comm = Comm(0, size, None, dist.group.WORLD)
        self.kv_replicas = 1
        self.kv_bytes_by_rank: list[int] = []  # each rank's KV store, as allocated
        self.send_s, self.sends = 0.0, 0  # seconds sending plans, and plans sent
        self.own_threads = torch.get_num_threads()  # this process's, given back at close
        self.error: str | None = None
        self.closed = False

    def setup(self, device_nccl: bool) -> None:
        """Create the all-reduce group (every rank calls this at the same point)."""
        if device_nccl:
            self.comm.device_group = dist.new_group(backend="nccl", timeout=STEP_TIMEOUT)

    def share(self, message: Any) -> None:
        """Send every rank `message` (setup: `Launch`, `StoreLayout`; None: stop)."""
        dist.broadcast_object_list([message], src=0, group=self.control)

    def check(self, own: Any) -> list[Any]:
        """Every rank's outcome of a setup phase, rank 0's `own` first: a string is an
        error, raised as KVForgeError (the group stopped) if any rank failed."""
        try:
            results = self.comm.gather_object(own, self.control)  # loading may take long
        except Exception as exc:  # a rank died while setting up
            self.abort()
            raise KVForgeError(
                f"a tensor-parallel rank failed while starting ({exc}); its output says why"
            ) from None
        failed = [r for r in results if isinstance(r, str)]
        if failed:
            self.share(None)  # the other ranks wait for the next setup message: stop
            self.abort()
            raise KVForgeError(failed[0])
        return results

    def abort(self) -> None:
        """Setup failed: stop the ranks started here (killed if they do not exit) and
        leave the group. Ranks under torchrun see rank 0's connections close."""
        self.error = self.error or "the engine was not built"
        self.close(stop_ranks=False)

    def run(self, worker, plan, consume=None):
        """Every rank executes `plan`; rank 0's part is `worker`'s (what it returns)."""
        if self.error is not None:
            raise EngineDeadError(self.error)
        if self.closed:
            raise EngineDeadError("the engine was closed; its tensor-parallel ranks are gone")
        try:
            start = time.perf_counter()
            plans = [_for_rank(plan, rank) for rank in range(self.size)]
            dist.scatter_object_list([None], plans, src=0, group=self.control)
            self.send_s += time.perf_counter() - start
            self.sends += 1
            return worker.run(plans[0], consume)
        except BaseException as exc:  # an interrupt too: the other ranks are mid-step
            dead = self._fail(exc)
            if isinstance(exc, Exception):
                raise dead from None
            raise

    def _fail(self, exc: Exception) -> EngineDeadError:
        """The group is broken (a rank is out of step): say why, stop every rank."""
        exits = []
        for rank, process in enumerate(self.processes, start=1):
            try:
                code = process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                continue
            exits.append(f"tensor-parallel rank {rank} exited with code {code}")
        reason = "; ".join(exits) or f"tensor-parallel step failed: {type(exc).__name__}: {exc}"
        self.error = f"{reason}; the engine cannot continue"
        self.close(stop_ranks=False)
        return EngineDeadError(self.error)

    def close(self, stop_ranks: bool = True) -> None:
        """Stop the other ranks (told to, or killed) and reap them; idempotent."""
        if self.closed:
            return
        self.closed = True
        if stop_ranks and self.error is None:
            # a rank already gone: the kill below reaps the others
            with contextlib.suppress(Exception):
                dist.scatter_object_list([None], [None] * self.size, src=0, group=self.control)
        for process in self.processes:
            try:
                process.wait(timeout=STOP_WAIT_S if stop_ranks else 1.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with contextlib.suppress(Exception):  # a broken group may not leave cleanly
            dist.destroy_process_group()
        torch.set_num_threads(self.own_threads)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_group(config, device: torch.device) -> TensorParallelGroup:
    """Rank 0 of `config.tensor_parallel_size` ranks: under torchrun (WORLD_SIZE set), the
    processes it started; otherwise ranks 1.. started here. Every rank is told `config`
    and starts loading its share of the model."""
    size = config.tensor_parallel_size
    processes: list[subprocess.Popen] = []
    if dist.is_initialized():
        raise KVForgeError(
            "this process runs a tensor-parallel engine already (torch.distributed has one "
            "group a process): close it first (LLM.close(), or `with LLM(...)`)"
        )
    if "WORLD_SIZE" in os.environ:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("RANK", "0"))
        if world != size or rank != 0:
            raise KVForgeError(
                f"tensor_parallel_size is {size} but torchrun started {world} processes "
                f"(this one rank {rank}); the engine runs on rank 0 of exactly that many"
            )
        threads = None
        dist.init_process_group("gloo", init_method="env://", rank=0, world_size=size,
                                timeout=STEP_TIMEOUT)  # fmt: skip
    else:
        init = f"tcp://127.0.0.1:{_free_port()}"
        threads = max(1, torch.get_num_threads() // size) if device.type == "cpu" else None
        for rank in range(1, size):
            command = [sys.executable, "-m", "kvforge.engine.parallel", "--rank", str(rank),
                       "--world-size", str(size), "--init", init]  # fmt: skip
            # a session of their own: a terminal's Ctrl-C interrupts rank 0 (which then
            # stops them), not the ranks in the middle of a step
            processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                              start_new_session=True))  # fmt: skip
        try:
            dist.init_process_group("gloo", init_method=init, rank=0, world_size=size,
                                    timeout=STEP_TIMEOUT)  # fmt: skip
        except BaseException as exc:
            for process in processes:
                process.kill()
                process.wait()
            if not isinstance(exc, Exception):
                raise
            raise KVForgeError(f"tensor-parallel ranks did not start: {exc}") from None
    own_threads = torch.get_num_threads()
    group = None
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        nccl = device.type == "cuda" and (not processes or torch.cuda.device_count() >= size)
        first = (device.index or 0) if device.type == "cuda" else 0
        launch = Launch(config, size, device.type, nccl, threads, first)
        group = TensorParallelGroup(size, processes, launch)
        group.own_threads = own_threads
        group.share(launch)
        group.setup(nccl)
        return group
    except BaseException:
        for process in processes:
            process.kill()
            process.wait()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        torch.set_num_threads(own_threads)
        raise


def _rank_device(launch: Launch, rank: int) -> torch.device:
    """A rank's device: under torchrun its LOCAL_RANK's GPU; started here, the rank-th GPU
    after rank 0's (ranks share GPUs round-robin when there are fewer)."""
    if launch.device_type != "cuda":
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    return torch.device("cuda", (launch.first_device + rank) % torch.cuda.device_count())


def run_worker(rank: int, size: int, init_method: str = "env://") -> None:
    """Rank `rank` (> 0): load its share of the model rank 0 names, allocate its store,
    then execute rank 0's plans until told to stop."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size,
                            timeout=STEP_TIMEOUT)  # fmt: skip
    try:
        _serve_rank(rank, size)
    finally:
        with contextlib.suppress(Exception):  # rank 0 may be gone already
            dist.destroy_process_group()


def _serve_rank(rank: int, size: int) -> None:
    from kvforge.engine.build import load_shard
    from kvforge.engine.worker import Worker
    from kvforge.kvcache.store import KVStore

    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def receive():
        message = [None]
        dist.broadcast_object_list(message, src=0, group=control)
        return message[0]

    launch: Launch = receive()
    if launch.threads is not None:
        torch.set_num_threads(launch.threads)
    device_group = dist.new_group(backend="nccl", timeout=STEP_TIMEOUT) if launch.nccl else None
    comm = Comm(rank, size, device_group, dist.group.WORLD)
    device = _rank_device(launch, rank)
    net, error = None, None
    try:
        net = load_shard(launch.config, device, comm)[0]
    except KVForgeError as exc:
        error = str(exc)
    comm.gather_object(error, control)
    layout: StoreLayout | None = receive()
    if layout is None:
        return
    try:
        store = KVStore(layout.spec, layout.fmt, layout.num_blocks, layout.block_size, device)
        outcome = store.bytes_allocated
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        outcome = f"rank {rank} cannot allocate its KV cache on {device}: {exc}"
    comm.gather_object(outcome, control)
    if receive() is not True:
        return
    worker = Worker(net, store, device, None, comm, layout.kv_replicas)
    while True:
        plan = [None]
        dist.scatter_object_list(plan, None, src=0, group=control)
        if plan[0] is None:
            return
        worker.run(plan[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a kvforge tensor-parallel rank (> 0)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--init", required=True)
    args = parser.parse_args(argv)
    run_worker(args.rank, args.world_size, args.init)


if __name__ == "__main__":
    main()
