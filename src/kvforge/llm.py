"""The Python API: `LLM(...).generate(prompts, SamplingParams(...))`.

Builds the model (a GGUF file, a checkpoint directory or a built-in model, named
as `models.catalog` says; None is SmolLM2-135M-Instruct), sizes the paged KV store
with the planner, and drives the engine until every request has finished.
"""

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvforge.engine.engine import LLMEngine
from kvforge.engine.request import Request, RequestMetrics, RequestOutput
from kvforge.engine.sampling import SamplingParams
from kvforge.engine.scheduler import SchedulerConfig
from kvforge.errors import ConfigError, KVForgeError, positive_int
from kvforge.kvcache.policy import KVPolicy, make_policy
from kvforge.kvcache.store import TORCH_DTYPES, KVStore
from kvforge.kvcache.tiers import DiskTier, HostTier, TieredBlocks
from kvforge.planner import (
    bytes_per_block,
    default_block_size,
    pool_size,
    residual_bytes,
    resolve_kv_format,
)
from kvforge.units import parse_bytes

DEFAULT_CPU_KV_BYTES = 512 * 2**20  # without kv_memory/num_blocks on a CPU
CUDA_MEMORY_FRACTION = 0.9  # of the free device memory after the weights, on CUDA

Prompt = str | list[int]


@dataclass(frozen=True)
class StreamEvent:
    """A new token of prompt number `index`, with the text it added.

    The last event of a prompt carries its `output`. A refused prompt gets one
    event with no token, finish_reason "abort" and the reason in output.error.
    """

    index: int
    token_id: int | None
    text: str
    finish_reason: str | None
    output: RequestOutput | None = None


class TokenIdsOnly:
    """Stands in for a missing tokenizer: prompts must be token ids, text stays empty."""

    def __init__(self, reason: str, eos_token_ids: frozenset[int]) -> None:
        self.reason = reason
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str) -> list[int]:
        raise KVForgeError(f"{self.reason}: give prompts as lists of token ids")

    def decode(self, ids: list[int]) -> str:
        return ""


def _memory_blocks(name: str, memory: int | str, block_bytes: int) -> int:
    """How many KV blocks `memory` (bytes or "4GiB") holds; KVForgeError if not one."""
    size = parse_bytes(memory) if isinstance(memory, str) else memory
    if isinstance(size, bool) or not isinstance(size, int) or size < block_bytes:
        raise KVForgeError(
            f"{name} must hold at least one KV block ({block_bytes:,} B), got {memory!r}"
        )
    return size // block_bytes


def _tiers(host_memory, disk_dir, disk_memory, block_bytes: int) -> TieredBlocks | None:
    """The lower tiers of the prefix cache that the options ask for, or None."""
    disk = None
    if disk_dir is not None:
        blocks = _memory_blocks("disk_cache_memory", disk_memory, block_bytes)
        try:
            disk = DiskTier(disk_dir, blocks)
        except OSError as exc:
            raise KVForgeError(f"disk_cache_dir {disk_dir!r} is not usable: {exc}") from None
    host = None
    if host_memory is not None:
        host = HostTier(_memory_blocks("host_cache_memory", host_memory, block_bytes), disk)
    if host is None and disk is None:
        return None
    return TieredBlocks(host, disk)


def _allocate_store(spec, fmt, num_blocks: int, block_size: int, device: torch.device,
                    max_running: int) -> KVStore:  # fmt: skip
    """The KV store, or an error naming the bytes asked for and what the device has."""
    kv_bytes = num_blocks * bytes_per_block(spec, fmt, block_size)
    kv_bytes += max_running * residual_bytes(spec, fmt, block_size)
    if device.type == "cpu":
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):  # not every OS reports free pages; allocate and see
            available = kv_bytes
        if kv_bytes > available:
            raise KVForgeError(
                f"the KV cache needs {kv_bytes:,} B but this machine has {available:,} B of "
                "free memory: lower kv_memory or num_blocks"
            )
    try:
        return KVStore(spec, fmt, num_blocks, block_size, device, max_running)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        raise KVForgeError(
            f"cannot allocate the KV cache ({kv_bytes:,} B) on {device}: {exc}; "
            "lower kv_memory or num_blocks"
        ) from None


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise KVForgeError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KVForgeError("device 'cuda' asked for, but torch sees no CUDA device")
        if resolved.index is not None and resolved.index >= count:
            raise KVForgeError(
                f"device {device!r} does not exist: torch sees {count} CUDA device(s)"
            )
    elif resolved.type != "cpu":
        raise KVForgeError(f"device {device!r} is not supported; use auto, cpu or cuda")
    return resolved


def _normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, str | list):
            raise KVForgeError(
                f"a prompt must be a string or a list of token ids, got {type(p).__name__}"
            )
    return prompts


class LLM:
    """An engine over one model and one paged KV cache (see DESIGN.md for the contract).

    With `enable_prefix_caching` (the default), a request reuses the K/V blocks of
    the longest prompt prefix any earlier request computed (under the same
    `cache_salt`) and computes only the rest; `metrics.cached_tokens` says how many.

    `kv_policy` (sliding, streaming, h2o, snapkv) with `kv_budget` keeps at most that
    many tokens of each request's KV; a policy object (`Streaming(256, sinks=8)`)
    carries its own options and budget.
    """

    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int | None = None,
        kv_memory: int | str | None = None,
        num_blocks: int | None = None,
        kv_dtype: str = "auto",
        enable_prefix_caching: bool = True,
        kv_policy: str | KVPolicy | None = None,
        kv_budget: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        seed: int = 0,
        preemption_mode: str = "recompute",
        host_cache_memory: int | str | None = None,
        disk_cache_dir: str | None = None,
        disk_cache_memory: int | str = "4GiB",
    ) -> None:
        from kvforge.models.builtin import BUILTIN_SEED, builtin_model
        from kvforge.models.catalog import find_model
        from kvforge.models.checkpoint import model_fingerprint
        from kvforge.models.gguf_file import read_gguf
        from kvforge.models.loader import load_model, load_tokenizer

        policy = make_policy(kv_policy, kv_budget)
        for name, value in (
            ("block_size", 1 if block_size is None else block_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_num_seqs", max_num_seqs),
        ):
            positive_int(name, value)
        self.device = _resolve_device(device)
        ref = find_model(model)
        self.model_name = ref.name
        if ref.kind == "random":
            net, tokenizer = builtin_model(self.device)
        else:
            source = read_gguf(ref.path) if ref.kind == "gguf" else ref.path
            net = load_model(source, dtype=dtype, device=self.device)
            try:
                tokenizer = load_tokenizer(source)
            except ConfigError as exc:
                tokenizer = TokenIdsOnly(str(exc), frozenset(net.config.eos_token_ids))
        net.fuse_projections()
        net.pack_weights()
        self.enable_prefix_caching = enable_prefix_caching
        config = net.config
        spec = config.spec
        weights_dtype = next(net.parameters()).dtype
        model_dtype = next(k for k, v in TORCH_DTYPES.items() if v == weights_dtype)
        if ref.path is None:
            model_id = f"{ref.name}:seed={BUILTIN_SEED}"
        else:
            model_id = model_fingerprint(ref.path, model_dtype)
        fmt = resolve_kv_format(spec, model_dtype if kv_dtype == "auto" else kv_dtype)
        block_size = default_block_size(fmt.name) if block_size is None else block_size
        # int2's recent tokens are kept at the precision the model computes in
        spec = dataclasses.replace(spec, dtype=model_dtype)
        block_bytes = bytes_per_block(spec, fmt, block_size)
        num_blocks, max_running = self._pool_size(
            num_blocks, kv_memory, spec, fmt, block_size, max_num_seqs
        )
        store = _allocate_store(spec, fmt, num_blocks, block_size, self.device, max_running)
        tiers = _tiers(host_cache_memory, disk_cache_dir, disk_cache_memory, block_bytes)
        self.engine = LLMEngine(
            net,
            tokenizer,
            store,
            SchedulerConfig(max_num_batched_tokens, max_running, preemption_mode),
            max_model_len=spec.max_position_embeddings,
            vocab_size=config.vocab_size,
            device=self.device,
            seed=seed,
            model_id=model_id,
            enable_prefix_caching=enable_prefix_caching,
            tiers=tiers,
            kv_policy=policy,
        )
        self.tokenizer = tokenizer

    def _pool_size(self, num_blocks, kv_memory, spec, fmt, block_size, max_num_seqs):
        """(blocks in the pool, requests that may run at once): num_blocks as given, or
        what kv_memory (default: 512 MiB on a CPU, 90% of free memory on CUDA) holds, as
        the planner sizes it (`planner.pool_size`)."""
        if num_blocks is not None:
            return positive_int("num_blocks", num_blocks), max_num_seqs
        if kv_memory is not None:
            kv_bytes = parse_bytes(kv_memory) if isinstance(kv_memory, str) else kv_memory
            if isinstance(kv_bytes, bool) or not isinstance(kv_bytes, int) or kv_bytes < 1:
                raise KVForgeError(
                    f"kv_memory must be a positive number of bytes, got {kv_memory!r}"
                )
        elif self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            kv_bytes = int(free_bytes * CUDA_MEMORY_FRACTION)
        else:
            kv_bytes = DEFAULT_CPU_KV_BYTES
        return pool_size(spec, fmt, block_size, kv_bytes, max_num_seqs,
                         cap_to_context=kv_memory is None)  # fmt: skip

    # --- generation -----------------------------------------------------------------

    def _submit(
        self, prompts: Prompt | Sequence[Prompt], sampling_params, cache_salt: str | None = None
    ) -> list[Request | RequestOutput]:
        prompts = _normalize_prompts(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise KVForgeError(f"{len(params)} sampling params for {len(prompts)} prompts")
        submitted: list[Request | RequestOutput] = []
        for prompt, p in zip(prompts, params, strict=True):
            try:
                submitted.append(self.engine.add_request(prompt, p, cache_salt=cache_salt))
            except KVForgeError as exc:  # refuse this one; the others still run
                submitted.append(_refused(prompt, str(exc)))
        return submitted

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in prompt order.

        A prompt that can never run (too long for the context or the pool) comes
        back with finish_reason "abort" and `error` naming the limit.
        """
        submitted = self._submit(prompts, sampling_params, cache_salt)
        try:
            while any(isinstance(s, Request) and s.finish_reason is None for s in submitted):
                self.engine.step()
        finally:  # an error or an interrupt must not leave requests holding blocks
            self._abort_unfinished(submitted)
        return [s if isinstance(s, RequestOutput) else s.output() for s in submitted]

    def _abort_unfinished(self, submitted: list[Request | RequestOutput]) -> None:
        for s in submitted:
            if isinstance(s, Request):
                self.engine.abort(s.request_id)

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> Iterator[StreamEvent]:
        """Yield each new token as it is produced, for all prompts interleaved."""
        submitted = self._submit(prompts, sampling_params, cache_salt)
        index = {id(s): i for i, s in enumerate(submitted)}
        shown = {id(s): "" for s in submitted}
        try:
            for i, s in enumerate(submitted):
                if isinstance(s, RequestOutput):
                    yield StreamEvent(i, None, "", "abort", s)
            while any(isinstance(s, Request) and s.finish_reason is None for s in submitted):
                for event in self.engine.step():
                    r = event.request
                    if event.token_id is None or id(r) not in index:
                        continue  # mid-prefill, or another caller's request
                    text = self.engine.stable_text(r)
                    delta, shown[id(r)] = text[len(shown[id(r)]) :], text
                    output = r.output() if event.finished else None
                    yield StreamEvent(index[id(r)], event.token_id, delta, r.finish_reason, output)
        finally:  # a consumer that stops early must not leave requests holding blocks
            self._abort_unfinished(submitted)

    def kv_stats(self) -> dict:
        return self.engine.kv_stats()


def _refused(prompt: Prompt, error: str) -> RequestOutput:
    return RequestOutput(
        request_id="",
        prompt=prompt if isinstance(prompt, str) else None,
        prompt_token_ids=[] if isinstance(prompt, str) else list(prompt),
        token_ids=[],
        text="",
        finish_reason="abort",
        metrics=RequestMetrics(arrival_s=0.0),
        error=error,
    )
