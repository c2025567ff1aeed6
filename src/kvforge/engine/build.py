"""Building an engine from its `EngineConfig`: the model and tokenizer loaded, the KV
pool sized by the planner and allocated once, the prefix cache's lower tiers opened.
`LLM` calls `build_engine`; nothing else in the API builds one."""

import dataclasses
import os

import torch

from kvforge.dtypes import dtype_name
from kvforge.engine.config import CacheConfig, EngineConfig
from kvforge.engine.engine import LLMEngine
from kvforge.engine.parallel import StoreLayout, start_group
from kvforge.engine.scheduler import SchedulerConfig
from kvforge.errors import ConfigError, KVForgeError
from kvforge.kvcache.formats import window_blocks, with_rotation, with_window
from kvforge.kvcache.store import KVStore
from kvforge.kvcache.tiers import DiskTier, HostTier, TieredBlocks
from kvforge.planner import (
    bytes_per_block,
    default_block_size,
    pool_size,
    rank_spec,
    resolve_kv_format,
)
from kvforge.units import parse_bytes

DEFAULT_CPU_KV_BYTES = 512 * 2**20  # without kv_memory/num_blocks on a CPU
CUDA_MEMORY_FRACTION = 0.9  # of the free device memory after the weights, on CUDA


def load_shard(config: EngineConfig, device: torch.device, comm=None):
    """The model `config` names, loaded on `device`: with `comm` (tensor parallelism),
    cut to its rank's share (`models.tensor_parallel`); then fused and packed for
    serving. Returns (model, tokenizer or None, the model's catalog entry)."""
    from kvforge.models.builtin import builtin_model
    from kvforge.models.catalog import find_model
    from kvforge.models.gguf_file import read_gguf
    from kvforge.models.loader import load_model
    from kvforge.models.quantized import apply_weights
    from kvforge.models.tensor_parallel import move_model, shard_model
    from kvforge.models.tokenizer import load_tokenizer

    ref = find_model(config.model)
    tokenizer = None
    dtype, weights = config.compute_dtype, config.weights_dtype
    target = device
    if comm is not None and device.type != "cpu":
        # a rank loads the model into host memory and moves only its share to the device;
        # what the loader would choose for that device is chosen here (GGUF: bf16, dense)
        device = torch.device("cpu")
        if ref.kind == "gguf":
            dtype = "bf16" if dtype == "auto" else dtype
            weights = dtype if weights == "auto" else weights
    if ref.kind == "random":
        net, tokenizer = builtin_model(device)
        apply_weights(net, weights, {})
    else:
        source = read_gguf(ref.path) if ref.kind == "gguf" else ref.path
        net = load_model(source, dtype, device, weights)
        if comm is None or comm.rank == 0:
            try:
                tokenizer = load_tokenizer(source)
            except ConfigError as exc:
                tokenizer = TokenIdsOnly(str(exc), frozenset(net.config.eos_token_ids))
    if comm is not None:
        shard_model(net, comm.rank, comm.size, comm.all_reduce)
        if target != device:
            move_model(net, target)
    net.fuse_projections()
    net.pack_weights()
    return net, tokenizer, ref


def build_engine(config: EngineConfig) -> tuple[LLMEngine, str]:
    """(the engine, the model's display name) for `config`; KVForgeError naming the
    problem for a model that cannot be loaded or a cache that cannot be allocated.
    With tensor_parallel_size N > 1 the other ranks start first (`engine.parallel`)
    and load their shares while rank 0, this process, loads its own."""
    from kvforge.models.catalog import find_model

    device = _resolve_device(config.device)
    find_model(config.model)  # a bad name is reported before any rank starts
    size = config.tensor_parallel_size
    group = start_group(config, device) if size > 1 else None
    try:
        return _build(config, device, group)
    except BaseException:
        if group is not None and not group.closed:
            group.abort()
        raise


def _build(config: EngineConfig, device: torch.device, group) -> tuple[LLMEngine, str]:
    from kvforge.models.builtin import BUILTIN_SEED
    from kvforge.models.checkpoint import model_fingerprint

    cache = config.cache
    size = config.tensor_parallel_size
    try:
        net, tokenizer, ref = load_shard(config, device, group and group.comm)
    except KVForgeError as exc:
        if group is None:
            raise
        group.check(str(exc))  # raises it, once every rank has stopped
    if group is not None:
        group.check(None)
    model_config = net.config
    weights_dtype = next(net.parameters()).dtype
    model_dtype = dtype_name(weights_dtype)
    if ref.path is None:
        model_id = f"{ref.name}:seed={BUILTIN_SEED}"
    else:
        # what computed a cached block: the file, the compute dtype, the weights' format
        model_id = model_fingerprint(ref.path, f"{model_dtype}/{config.weights_dtype}")
    if size > 1:  # a block's bytes are every rank's share of its heads
        model_id += f"/tp={size}"
    # int2's recent tokens are kept at the precision the model computes in
    spec = dataclasses.replace(model_config.spec, dtype=model_dtype)
    fmt = resolve_kv_format(spec, cache.kv_dtype, cache.kv_skip_layers)  # range checked here
    fmt = with_rotation(fmt, cache.kv_rotation)
    fmt = with_window(fmt, cache.kv_recent_tokens, cache.kv_exact_sinks)
    block_size = cache.block_size or default_block_size(fmt.name)
    share = rank_spec(spec, size)  # each rank's heads; the pool's blocks are the same
    sharing = 1  # ranks on rank 0's GPU (started here, fewer GPUs than ranks)
    if group is not None and device.type == "cuda" and group.processes:
        sharing = -(-size // torch.cuda.device_count())
    num_blocks = _pool_size(config, share, fmt, block_size, device, sharing)
    store = _allocate_store(share, fmt, num_blocks, block_size, device)
    if group is not None:
        replicas = max(1, size // spec.num_kv_heads)
        group.kv_replicas = replicas
        group.share(StoreLayout(share, fmt, num_blocks, block_size, replicas))
        group.kv_bytes_by_rank = group.check(store.bytes_allocated)
        group.share(True)
    tiers = _tiers(cache, size * bytes_per_block(share, fmt, block_size), store, size)
    engine = LLMEngine(
        net,
        tokenizer,
        store,
        SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, config.preemption_mode),
        max_model_len=spec.max_position_embeddings,
        vocab_size=model_config.vocab_size,
        device=device,
        seed=config.seed,
        model_id=model_id,
        enable_prefix_caching=cache.enable_prefix_caching,
        tiers=tiers,
        kv_policy=cache.kv_policy,
        kv_events=_event_publisher(cache),
        group=group,
    )
    return engine, ref.name


def _event_publisher(cache: CacheConfig):
    """The KV events publisher the options ask for (None: none); KVForgeError if its
    endpoint cannot be bound."""
    if cache.kv_events_endpoint is None:
        return None
    import zmq

    from kvforge.events import EventPublisher

    try:
        return EventPublisher(cache.kv_events_endpoint, cache.kv_events_replay_endpoint)
    except zmq.ZMQError as exc:
        raise KVForgeError(
            f"cannot publish KV events at {cache.kv_events_endpoint!r} "
            f"(or replay at {cache.kv_events_replay_endpoint!r}): {exc}"
        ) from None


def _size(name: str, value: int | str) -> int:
    """A size given as bytes or as text ("2GiB"); KVForgeError if it is not positive."""
    size = parse_bytes(value) if isinstance(value, str) else value
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise KVForgeError(f"{name} must be a positive number of bytes, got {value!r}")
    return size


def _pool_size(config: EngineConfig, spec, fmt, block_size: int, device: torch.device,
               sharing: int = 1):  # fmt: skip
    """Blocks in the pool: num_blocks as given, or what kv_memory (default: 512 MiB on a
    CPU, 90% of free memory on CUDA) holds, as the planner sizes it (`planner.pool_size`).
    Either must hold a request's recent window (int4, int2) and a block."""
    cache = config.cache
    if cache.num_blocks is not None:
        window = window_blocks(spec, fmt, block_size)
        if cache.num_blocks < 1 + window:
            raise KVForgeError(
                f"num_blocks={cache.num_blocks} is too few for {fmt.name}: a running request "
                f"borrows {window} blocks for its full-precision recent window, and needs one "
                f"more; use num_blocks >= {window + 1}"
            )
        return cache.num_blocks
    if cache.kv_memory is not None:
        kv_bytes = _size("kv_memory", cache.kv_memory)
    elif device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        kv_bytes = int(free_bytes * CUDA_MEMORY_FRACTION) // sharing
    else:
        kv_bytes = DEFAULT_CPU_KV_BYTES
    return pool_size(spec, fmt, block_size, kv_bytes, config.max_num_seqs,
                     cap_to_context=cache.kv_memory is None)  # fmt: skip


class TokenIdsOnly:
    """Stands in for a missing tokenizer: prompts must be token ids, text stays empty."""

    def __init__(self, reason: str, eos_token_ids: frozenset[int]) -> None:
        self.reason = reason
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise KVForgeError(f"{self.reason}: give prompts as lists of token ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""

    def token_text(self, token_id: int) -> str:
        return ""

    def info(self) -> dict:
        return {"tokenizer_class": None, "bos_token": None, "eos_token": None,
                "pad_token": None, "unk_token": None, "chat_template": None,
                "add_bos_token": None}  # fmt: skip


def _memory_blocks(name: str, memory: int | str, block_bytes: int) -> int:
    """How many KV blocks `memory` (bytes or "4GiB") holds; KVForgeError if not one."""
    size = parse_bytes(memory) if isinstance(memory, str) else memory
    if isinstance(size, bool) or not isinstance(size, int) or size < block_bytes:
        raise KVForgeError(
            f"{name} must hold at least one KV block ({block_bytes:,} B), got {memory!r}"
        )
    return size // block_bytes


def _tiers(cache: CacheConfig, block_bytes: int, store: KVStore, ranks: int = 1
           ) -> TieredBlocks | None:  # fmt: skip
    """The lower tiers of the prefix cache that the options ask for, or None. With
    several ranks a tier's block is every rank's share, [ranks, rank's block]."""
    disk_dir, host_memory = cache.disk_cache_dir, cache.host_cache_memory
    disk = None
    if disk_dir is not None:
        blocks = _memory_blocks("disk_cache_memory", cache.disk_cache_memory, block_bytes)
        try:
            disk = DiskTier(disk_dir, blocks)
        except OSError as exc:
            raise KVForgeError(f"disk_cache_dir {disk_dir!r} is not usable: {exc}") from None
    host = None
    if host_memory is not None:
        host = HostTier(_memory_blocks("host_cache_memory", host_memory, block_bytes), disk)
    remote = None
    if cache.kv_remote is not None:
        from kvforge.kvcache.remote import RemoteTier

        remote = RemoteTier(cache.kv_remote)  # connects on first use: a down server is a miss
    if host is None and disk is None and remote is None:
        return None
    shape = store.block_shape if ranks == 1 else (ranks, *store.block_shape)
    return TieredBlocks(host, disk, shape, store.dtype, remote)


def _allocate_store(spec, fmt, num_blocks: int, block_size: int, device: torch.device
                    ) -> KVStore:  # fmt: skip
    """The KV store, or an error naming the bytes asked for and what the device has."""
    kv_bytes = num_blocks * bytes_per_block(spec, fmt, block_size)
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
        return KVStore(spec, fmt, num_blocks, block_size, device)
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
