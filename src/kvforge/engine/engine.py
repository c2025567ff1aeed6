"""The engine: requests in, tokens out, one scheduler step at a time.

    def step(self):
        batch = self.scheduler.schedule()
        token_ids = self.runner.run(batch)
        return self._update(batch, token_ids)

Requests that can never fit are refused at `add_request` with an error that
names the limit; everything already admitted keeps running.
"""

import itertools
import time
from dataclasses import dataclass

import torch

from kvforge.engine.limits import RequestLimits
from kvforge.engine.pruning import Pruner
from kvforge.engine.request import Request, RequestMetrics, Status, stable_text
from kvforge.engine.runner import ModelRunner
from kvforge.engine.sampling import SamplingParams
from kvforge.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput
from kvforge.errors import KVForgeError
from kvforge.events import AllBlocksCleared, KVEvents
from kvforge.kvcache.block_table import BlockTable
from kvforge.kvcache.formats import window_blocks
from kvforge.kvcache.manager import KVCacheManager
from kvforge.kvcache.policy import KVPolicy
from kvforge.kvcache.store import KVStore
from kvforge.kvcache.tiers import TieredBlocks


@dataclass(frozen=True)
class DecodeStep:
    """The last step that only decoded (one new token per request): what the KV cache
    inspector sets against the memory-bandwidth floor (`kvforge.roofline`)."""

    seconds: float  # the whole step: schedule, forward pass, sampling, bookkeeping
    batch: int
    kv_tokens: int  # cached tokens the step's attention read, over the batch


@dataclass(frozen=True)
class StepEvent:
    """One request's progress in one step: its new token (None mid-prefill)."""

    request: Request
    token_id: int | None

    @property
    def finished(self) -> bool:
        return self.request.status is Status.FINISHED


class LLMEngine:
    """Owns the tokenizer, the KV cache manager, the scheduler and the model runner."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        store: KVStore,
        scheduler_config: SchedulerConfig,
        max_model_len: int,
        vocab_size: int,
        device: torch.device,
        seed: int = 0,
        model_id: str = "",
        enable_prefix_caching: bool = True,
        tiers: TieredBlocks | None = None,
        kv_policy: KVPolicy | None = None,
        kv_events=None,
        group=None,
    ) -> None:
        """`kv_events`: a `kvforge.events.EventPublisher` that each step's KV cache events
        (blocks the prefix cache stores and evicts) go out on, in vLLM's format.
        `group`: the tensor-parallel group (`engine.parallel`) the model and `store` are
        rank 0's shares of."""
        self.tokenizer = tokenizer
        self.kv_policy = kv_policy  # every request's, unless it names its own
        self.last_score_peak_kv_tokens = 0  # the most tokens the last `score` held
        # what the prefix cache's keys say computed and stored the blocks
        self.model_id = model_id
        self.enable_prefix_caching = enable_prefix_caching
        self.store = store
        self.tiers = tiers if enable_prefix_caching else None
        self.manager = KVCacheManager(
            store.num_blocks,
            store.block_size,
            token_moves=store.token_moves,
            cache_id=(model_id, store.format.key) if enable_prefix_caching else None,
            tiers=self.tiers,
            sliding_window=store.spec.sliding_window,
            recent_tokens=store.format.residual_tokens,
            window_blocks=window_blocks(store.spec, store.format, store.block_size),
            events=KVEvents(store.block_size) if kv_events is not None else None,
        )
        self.kv_events = kv_events
        if self.tiers is not None and self.manager.events is not None:
            self.tiers.watch(self.manager.events)
        if kv_events is not None:
            kv_events.publish([AllBlocksCleared()])  # a new engine holds no block
        self.pool = self.manager.pool
        self.scheduler = Scheduler(self.manager, scheduler_config)
        self.runner = ModelRunner(model, store, device, self.tiers, group)
        self.tensor_parallel_size = 1 if group is None else group.size
        self.pruner = Pruner(store, self.manager)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        fmt = store.format
        self.limits = RequestLimits(
            vocab_size, max_model_len, store.block_size, self.pool.num_blocks,
            self.manager.window_blocks, store.token_moves, fmt.residual_tokens, fmt.name,
            kv_policy,
        )  # fmt: skip
        self.limits.check_policy(kv_policy)
        self.requests: dict[str, Request] = {}
        self.last_decode: DecodeStep | None = None
        self._ids = itertools.count()
        self._seeds = torch.Generator().manual_seed(seed)
        self.device = device

    # --- requests -------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        kv_policy: KVPolicy | None = None,
    ) -> Request:
        """Validate and queue a request; KVForgeError (naming the limit) if it can never run.

        Requests with different `cache_salt` never share prefix-cache blocks.
        `kv_policy`: this request's eviction policy (default: the engine's)."""
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise KVForgeError(f"cache_salt must be a string, got {cache_salt!r}")
        policy = kv_policy if kv_policy is not None else self.kv_policy
        text, token_ids = self.tokenize(prompt)
        self.check_request(token_ids, params, policy)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise KVForgeError(f"request id {request_id!r} is already in use")
        generator = None
        if not params.greedy:
            seed = params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            generator = torch.Generator(device="cpu").manual_seed(seed)
        request = Request(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            block_table=BlockTable(self.store.block_size),
            metrics=RequestMetrics(arrival_s=time.perf_counter(), prompt_tokens=len(token_ids)),
            eos_token_ids=frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids,
            generator=generator,
            kv_policy=policy,
        )
        self.manager.start(request, cache_salt)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        return None, list(prompt)

    def check_request(
        self, token_ids: list[int], params: SamplingParams, policy: KVPolicy | None = None
    ) -> None:
        """KVForgeError naming the limit if this request could never run. Reads only the
        engine's fixed limits (`limits`), so any thread may call it."""
        self.limits.check(token_ids, params, policy)

    def score(
        self, token_ids: list[int], chunk_size: int = 64, kv_policy: KVPolicy | None = None
    ) -> torch.Tensor:
        """log p(token i | tokens < i) for i = 1 .. n-1, [n - 1] float32, teacher-forced.

        The tokens go through the KV cache `chunk_size` at a time, as a prompt's chunked
        prefill would: each chunk reads the earlier ones from the cache as stored, so the
        result measures what the cache setting (codec, eviction policy) costs. With a
        policy, every chunk counts as the end of a prefill (snapkv compresses after each)
        and the cache is compacted as in generation. Needs an idle engine; its blocks are
        returned at the end.
        """
        if self.scheduler.has_unfinished:
            raise KVForgeError("score needs an engine with no requests in flight")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise KVForgeError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        policy = kv_policy if kv_policy is not None else self.kv_policy
        self.check_request(token_ids[:-1], SamplingParams(max_tokens=1), policy)
        r = Request(
            request_id=f"score-{next(self._ids)}",
            prompt=None,
            prompt_token_ids=list(token_ids),
            params=SamplingParams(max_tokens=1),
            block_table=BlockTable(self.store.block_size),
            metrics=RequestMetrics(arrival_s=time.perf_counter(), prompt_tokens=len(token_ids)),
            eos_token_ids=frozenset(),
            kv_policy=policy,
        )
        targets = torch.tensor(token_ids[1:], dtype=torch.long)
        out = []
        try:
            while r.num_computed_tokens < len(token_ids) - 1:
                n = min(chunk_size, len(token_ids) - 1 - r.num_computed_tokens)
                item = ScheduledRequest(r, n, self.manager.allocate_slots(r, n), prompt_done=True)
                logits = self.runner.all_logits(SchedulerOutput([item], self.manager.take_ops()))
                start = r.num_computed_tokens
                logprobs = torch.log_softmax(logits.cpu(), dim=-1)
                out.append(logprobs.gather(1, targets[start : start + n, None]).squeeze(1))
                r.num_computed_tokens += n
                collected = self.runner.collected
                self.pruner.after_pass(r, True, collected.scores.get(0) if collected else None)
        finally:
            self.last_score_peak_kv_tokens = r.metrics.peak_kv_tokens
            self.manager.free(r)
            self.runner.execute(self.manager.take_ops())
        return torch.cat(out)

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request can have: context and pool."""
        return self.limits.max_request_tokens

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its blocks; unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None and request.status is not Status.FINISHED:
            self._finish(request, "abort")
            self.runner.execute(self.manager.take_ops())

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the loop -------------------------------------------------------------------

    def step(self) -> list[StepEvent]:
        start = time.perf_counter()
        step = self.scheduler.schedule()
        try:
            token_ids = self.runner.run(step)
        except BaseException as exc:
            # Slots were reserved for tokens that were never computed: end these requests
            # (blocks back to the pool) rather than leave their tables out of step.
            for item in step.scheduled:
                item.request.error = f"the forward pass failed: {type(exc).__name__}: {exc}"
                self._finish(item.request, "abort")
            self.runner.execute(self.manager.take_ops())  # their blocks let go of
            raise
        events = self._update(step.scheduled, token_ids)
        self.runner.execute(self.manager.take_ops())  # registered, pruned, freed
        if self.kv_events is not None and self.manager.events is not None:
            self.kv_events.publish(self.manager.events.take())
        batch = step.scheduled
        if batch and all(item.num_new_tokens == 1 for item in batch):
            kv_tokens = sum(item.request.num_kv_tokens for item in batch)
            self.last_decode = DecodeStep(time.perf_counter() - start, len(batch), kv_tokens)
        return events

    def _update(self, batch, token_ids: list[int | None]) -> list[StepEvent]:
        now = time.perf_counter()
        events = []
        collected = self.runner.collected
        for i, (item, token) in enumerate(zip(batch, token_ids, strict=True)):
            r = item.request
            r.num_computed_tokens += item.num_new_tokens
            self.manager.register(r)
            scores = collected.scores.get(i) if collected else None
            self.pruner.after_pass(r, item.prompt_done, scores)
            if i in self.runner.prompt_logprobs:
                r.prompt_logprobs += self.runner.prompt_logprobs[i]
            if token is not None and r.params.max_tokens == 0:  # only the prompt is scored
                r.metrics.first_token_s = now
                self._finish(r, "length")
                token = None
            elif token is not None:
                if i in self.runner.logprobs:
                    r.logprobs.append(self.runner.logprobs[i])
                self._append_token(r, token, now)
            events.append(StepEvent(r, token))
        return events

    def _append_token(self, r: Request, token: int, now: float) -> None:
        r.output_token_ids.append(token)
        self.manager.update_keys(r)
        r.metrics.completion_tokens = len(r.output_token_ids)
        if r.metrics.first_token_s is None:
            r.metrics.first_token_s = now
        stops = r.params.stop_token_ids or ()
        if token in r.eos_token_ids or token in stops:
            self._finish(r, "stop", drop_last=True)
            return
        if r.params.stop_strings and self._hit_stop_string(r):
            self._finish(r, "stop", keep_text=True)
            return
        if len(r.output_token_ids) >= r.params.max_tokens:
            self._finish(r, "length")

    def _hit_stop_string(self, r: Request) -> bool:
        r.text = self.tokenizer.decode(r.output_token_ids)
        hits = [i for i in (r.text.find(s) for s in r.params.stop_strings) if i >= 0]
        if hits:
            r.text = r.text[: min(hits)]
        return bool(hits)

    def _finish(
        self, r: Request, reason: str, drop_last: bool = False, keep_text: bool = False
    ) -> None:
        self.scheduler.finish(r, reason)
        if not keep_text:
            visible = r.output_token_ids[:-1] if drop_last else r.output_token_ids
            r.text = self.tokenizer.decode(visible)
        r.metrics.finish_s = time.perf_counter()
        self.requests.pop(r.request_id, None)

    def decode_text(self, r: Request) -> str:
        """The request's text so far (for streaming)."""
        if r.status is Status.FINISHED:
            return r.text
        return self.tokenizer.decode(r.output_token_ids)

    def stable_text(self, r: Request) -> str:
        """The request's text so far that later tokens cannot change (see `stable_text`)."""
        return stable_text(r, self.decode_text(r))

    # --- the cache ------------------------------------------------------------------

    def kv_stats(self) -> dict:
        ranks = self.tensor_parallel_size
        return {
            **self.manager.stats(self.scheduler.running),
            "tensor_parallel_size": ranks,
            "bytes_per_token": self.store.bytes_per_token * ranks,  # every rank's heads
            "bytes_per_token_per_rank": self.store.bytes_per_token,
            "kv_skip_layers": list(self.store.format.skip_layers),
            "kv_bytes_allocated": self.store.bytes_allocated * ranks,
            "kv_bytes_allocated_per_rank": self.store.bytes_allocated,
            # as each rank allocated its store (rank 0's is `store`)
            "kv_bytes_allocated_by_rank": (
                [self.store.bytes_allocated]
                if self.runner.group is None
                else list(self.runner.group.kv_bytes_by_rank)
            ),
            "kv_recent_tokens": self.store.format.residual_tokens or None,
            "kv_exact_sinks": bool(self.store.format.sink_blocks),
            "window_blocks_per_request": self.manager.window_blocks,
            "max_num_seqs": self.scheduler.config.max_num_seqs,
            **(self.tiers.stats() if self.tiers is not None else {}),
        }

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank)."""
        if self.runner.group is not None:
            self.runner.group.close()

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache (first admissions)."""
        return self.manager.prefix_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Prompt tokens found in the prefix cache, so not computed."""
        return self.manager.prefix_hits
