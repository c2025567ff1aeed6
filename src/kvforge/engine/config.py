"""What an engine is built from: typed, frozen, validated once on construction.

`EngineConfig.create` is the one mapping from `LLM`'s keyword arguments (and so from
the CLI's flags, which are passed as those arguments) to the configs: the model
and where it runs, the KV cache (`CacheConfig`) and the scheduler's limits. What
depends on the model (bytes per block, so whether a memory size holds a block,
the pool's blocks) is settled when the engine is built (`engine.build`), in the
order a user's error is reported: the policy, the counts, the device, the model,
then the sizes.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from kvforge.dtypes import FLOAT_DTYPES
from kvforge.engine.scheduler import PREEMPTION_MODES
from kvforge.errors import KVForgeError, positive_int
from kvforge.kvcache.formats import check_skip_layers, get_kv_format, with_rotation, with_window
from kvforge.kvcache.policy import KVPolicy, make_policy
from kvforge.planner import DEFAULT_MAX_NUM_SEQS

DEFAULT_DISK_CACHE_MEMORY = "4GiB"
WEIGHTS_DTYPES = ("auto", *FLOAT_DTYPES, "int8", "int4")


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache: its format, its size (kv_memory bytes, or num_blocks), block size
    (None: the format's default), prefix caching and its lower tiers, and the eviction
    policy every request gets unless it names its own."""

    kv_dtype: str = "auto"
    block_size: int | None = None
    kv_memory: int | str | None = None  # bytes or "2GiB"; checked when the pool is sized
    num_blocks: int | None = None
    enable_prefix_caching: bool = True
    host_cache_memory: int | str | None = None  # checked against a block's bytes
    disk_cache_dir: str | None = None
    disk_cache_memory: int | str = DEFAULT_DISK_CACHE_MEMORY
    kv_remote: str | None = None  # redis://HOST:PORT/DB: the shared remote tier
    kv_policy: KVPolicy | None = None
    kv_rotation: bool | None = None  # None: the KV format's default
    # layers kept in the model's dtype; checked against its layer count when it is loaded
    kv_skip_layers: tuple[int, ...] = ()
    # int4's and int2's full-precision window: None and False take the format's own
    kv_recent_tokens: int | None = None
    kv_exact_sinks: bool = False
    # where KV cache events go out in vLLM's format (kvforge.events), and their replay
    kv_events_endpoint: str | None = None
    kv_events_replay_endpoint: str | None = None

    def __post_init__(self) -> None:
        check_skip_layers(self.kv_skip_layers)  # errors name the index
        if self.kv_dtype != "auto":
            fmt = get_kv_format(self.kv_dtype)
            with_rotation(fmt, self.kv_rotation)  # errors name why
            with_window(fmt, self.kv_recent_tokens, self.kv_exact_sinks)
        if self.kv_events_replay_endpoint is not None and self.kv_events_endpoint is None:
            raise KVForgeError("kv_events_replay_endpoint needs kv_events_endpoint")
        if self.kv_events_endpoint is not None and not self.enable_prefix_caching:
            raise KVForgeError("kv_events_endpoint needs prefix caching: events are its blocks")
        if self.kv_remote is not None:
            from kvforge.kvcache.remote import redis_url

            try:
                redis_url(self.kv_remote)
            except ValueError as exc:
                raise KVForgeError(str(exc)) from None
            if not self.enable_prefix_caching:
                raise KVForgeError("kv_remote needs prefix caching: the tier holds its blocks")
        if self.kv_exact_sinks not in (True, False):
            raise KVForgeError(f"kv_exact_sinks must be True or False, got {self.kv_exact_sinks!r}")
        if self.kv_rotation not in (None, True, False):
            raise KVForgeError(f"kv_rotation must be None, True or False, got {self.kv_rotation!r}")
        if self.block_size is not None:
            positive_int("block_size", self.block_size)
        if self.num_blocks is not None:
            positive_int("num_blocks", self.num_blocks)
        if self.kv_policy is not None and not isinstance(self.kv_policy, KVPolicy):
            raise KVForgeError(f"kv_policy must be a KVPolicy here, got {self.kv_policy!r}")


@dataclass(frozen=True)
class EngineConfig:
    """The model (`models.catalog` names it), its weights' dtype, the device, the KV
    cache, the scheduler's limits and the sampling seed of requests without one."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    cache: CacheConfig = CacheConfig()
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    preemption_mode: str = "recompute"
    seed: int = 0
    # how matmul weights are kept: auto (a GGUF file's own quantization), a float dtype
    # (dense, and the dtype the model computes in), int8 or int4 (see models.quantized)
    weights_dtype: str = "auto"
    # ranks each layer is split across (engine.parallel); the model must divide by it
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        positive_int("tensor_parallel_size", self.tensor_parallel_size)
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise KVForgeError(
                f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, "
                f"got {self.weights_dtype!r}"
            )
        if self.weights_dtype in FLOAT_DTYPES and self.dtype not in ("auto", self.weights_dtype):
            raise KVForgeError(
                f"weights_dtype {self.weights_dtype!r} and dtype {self.dtype!r} disagree: a "
                "model with dense weights computes in their dtype"
            )
        positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        positive_int("max_num_seqs", self.max_num_seqs)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise KVForgeError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                f"got {self.preemption_mode!r}"
            )

    @classmethod
    def create(
        cls,
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
    ) -> "EngineConfig":
        """The configs `LLM(**kwargs)` asks for (the same names and defaults)."""
        policy = make_policy(kv_policy, kv_budget)  # first: its errors come first
        for name, value in (("block_size", 1 if block_size is None else block_size),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("max_num_seqs", max_num_seqs)):  # fmt: skip
            positive_int(name, value)
        cache = CacheConfig(
            kv_dtype=kv_dtype,
            block_size=block_size,
            kv_memory=kv_memory,
            num_blocks=num_blocks,
            enable_prefix_caching=enable_prefix_caching,
            host_cache_memory=host_cache_memory,
            disk_cache_dir=disk_cache_dir,
            disk_cache_memory=disk_cache_memory,
            kv_remote=kv_remote,
            kv_policy=policy,
            kv_rotation=kv_rotation,
            kv_skip_layers=check_skip_layers(kv_skip_layers),
            kv_recent_tokens=kv_recent_tokens,
            kv_exact_sinks=kv_exact_sinks,
            kv_events_endpoint=kv_events_endpoint,
            kv_events_replay_endpoint=kv_events_replay_endpoint,
        )
        return cls(model, dtype, device, cache, max_num_batched_tokens, max_num_seqs,
                   preemption_mode, seed, weights_dtype, tensor_parallel_size)  # fmt: skip

    @property
    def compute_dtype(self) -> str:
        """The dtype the model computes in: dense weights' own, else `dtype`."""
        return self.weights_dtype if self.weights_dtype in FLOAT_DTYPES else self.dtype
