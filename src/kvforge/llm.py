"""The Python API: `LLM(...).generate(prompts, SamplingParams(...))`.

The keyword arguments become an `EngineConfig` (validated once), from which
`engine.build` builds the engine: the model (a GGUF file, a checkpoint directory or
a built-in model, named as `models.catalog` says; None is SmolLM2-135M-Instruct)
and the paged KV store the planner sizes. `LLM` drives it until every request has
finished.
"""

import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from kvforge.engine.build import build_engine
from kvforge.engine.config import DEFAULT_DISK_CACHE_MEMORY, EngineConfig
from kvforge.engine.request import Request, RequestMetrics, RequestOutput
from kvforge.engine.sampling import SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.policy import KVPolicy
from kvforge.planner import DEFAULT_MAX_NUM_SEQS

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
    """An engine over one model and one paged KV cache (ARCHITECTURE.md has the map).

    With `enable_prefix_caching` (the default), a request reuses the K/V blocks of
    the longest prompt prefix any earlier request computed (under the same
    `cache_salt`) and computes only the rest; `metrics.cached_tokens` says how many.

    `kv_policy` (sliding, streaming, h2o, snapkv) with `kv_budget` keeps at most that
    many tokens of each request's KV; a policy object (`Streaming(256, sinks=8)`)
    carries its own options and budget.

    `weights_dtype`: "auto" keeps a GGUF file's Q4_0/Q4_1/Q8_0 matmul weights in their
    own blocks (multiplied by kvforge's int4/int8 CPU kernels) and an HF checkpoint
    in its dtype; "fp32", "fp16", "bf16" serve dense weights in that dtype; "int8" and
    "int4" quantize every matmul weight (int4 keeps the embedding and LM head int8).

    `kv_rotation`: rotate each head's K and V by a fixed orthonormal (Hadamard) matrix
    before a quantized KV format stores them, which spreads outlier channels; None
    takes the format's default.

    `kv_skip_layers`: layers (e.g. [0, 29], the ones that need precision) whose K and V stay
    in the model's own dtype, stored as computed and unrotated, while every other layer
    takes `kv_dtype`; with an unquantized `kv_dtype` they still take the model's dtype.
    They are part of the prefix cache's key, and the planner counts their bytes.

    `kv_recent_tokens` (int4, int2; default 32): the newest tokens of each request kept in
    full precision until their block is packed; `kv_exact_sinks`: each request's first
    block (its attention sinks) kept in full precision too while it runs. Both are held in
    pool blocks a running request borrows (`kv_stats()["window_blocks_per_request"]`).

    `kv_events_endpoint` ("tcp://127.0.0.1:5557"): publish the prefix cache's block events
    there in vLLM's format (`kvforge.events`), with replay at `kv_events_replay_endpoint`.

    `kv_remote` ("redis://127.0.0.1:6379/0", or valkey://): a Redis server as the prefix
    cache's lowest tier, shared by every replica pointed at it: each computed block is
    written through in the background and any replica loads it instead of recomputing it
    (`kvcache.remote`). Best effort: an absent or slow server is a miss, never an error.

    `tensor_parallel_size` N: split every layer across N ranks (`engine.parallel`): N
    processes on this machine, started here (a CPU's cores split between them), or the
    processes torchrun started. Each rank holds its share of the weights and of the KV
    heads (num_kv_heads / N each; with fewer KV heads than ranks, one replicated), so a
    rank's KV bytes per token are the planner's `bytes_per_token_per_rank`; `kv_memory` is
    each rank's. N must divide the query heads and the MLP, and divide or be divided by the
    KV heads (`planner.tensor_parallel_sizes`). Use `with LLM(...)` or `close()` to stop the
    ranks before the object goes.
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
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        seed: int = 0,
        preemption_mode: str = "recompute",
        host_cache_memory: int | str | None = None,
        disk_cache_dir: str | None = None,
        disk_cache_memory: int | str = DEFAULT_DISK_CACHE_MEMORY,
        kv_remote: str | None = None,
        weights_dtype: str = "auto",
        kv_rotation: bool | None = None,
        kv_skip_layers: Iterable[int] | None = (),
        kv_recent_tokens: int | None = None,
        kv_exact_sinks: bool = False,
        kv_events_endpoint: str | None = None,
        kv_events_replay_endpoint: str | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        self.config = EngineConfig.create(
            model=model,
            dtype=dtype,
            device=device,
            block_size=block_size,
            kv_memory=kv_memory,
            num_blocks=num_blocks,
            kv_dtype=kv_dtype,
            enable_prefix_caching=enable_prefix_caching,
            kv_policy=kv_policy,
            kv_budget=kv_budget,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            seed=seed,
            preemption_mode=preemption_mode,
            host_cache_memory=host_cache_memory,
            disk_cache_dir=disk_cache_dir,
            disk_cache_memory=disk_cache_memory,
            kv_remote=kv_remote,
            weights_dtype=weights_dtype,
            kv_rotation=kv_rotation,
            kv_skip_layers=kv_skip_layers,
            kv_recent_tokens=kv_recent_tokens,
            kv_exact_sinks=kv_exact_sinks,
            kv_events_endpoint=kv_events_endpoint,
            kv_events_replay_endpoint=kv_events_replay_endpoint,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.engine, self.model_name = build_engine(self.config)
        # the other tensor-parallel ranks stop with this object (or at exit), or at close()
        self._finalizer = weakref.finalize(self, self.engine.close)
        self.device = self.engine.device
        self.tokenizer = self.engine.tokenizer
        self.enable_prefix_caching = self.engine.enable_prefix_caching

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

    def close(self) -> None:
        """Stop the engine's other tensor-parallel ranks; the LLM cannot run after."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
