"""`kvforge eval` tasks: what a cache setting costs in quality, next to the KV bytes it used.

    perplexity  a text scored token by token through the cache (teacher-forced, in
                chunks, so later tokens read earlier ones as the cache stores them):
                English prose by default, or code (`corpus.py`)
    passkey     a 5-digit key hidden at a depth of a filler document, asked for at the
                end (through the model's chat template when it has one: "What is the
                pass key?"): accuracy over a grid of context lengths x depths
    agreement   greedy tokens and next-token distributions against the full-precision,
                full cache of the same model on a fixed prompt set (prose and passkey
                documents)

Each returns a JSON-ready dict with the setting (kv_dtype, block size, bytes per token)
and the KV bytes one request of the measured length holds (the planner's count, which
the store allocates exactly; int2's recent windows included).
"""

import math
import re

from kvforge.chat_template import chat_prompt, has_chat_template
from kvforge.errors import KVForgeError
from kvforge.eval.corpus import corpus_text
from kvforge.kvcache.policy import make_policy
from kvforge.planner import bytes_per_request
from kvforge.training.data import PASSKEY_FORMS, passkey_prompt

SHORT_LENGTHS = (256, 512, 1024, 1536, 2000)  # a 2,048-token model's grid
LONG_LENGTHS = (1024, 2048, 4096, 8192)  # up to the model's context, answer included
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8  # generated after a passkey prompt: enough for 5 digits and a period
CHAT_ANSWER_TOKENS = 24  # a chat reply: "The pass key is 12345." and a little more
CORPUS_LABELS = {"prose": "prose: Python docs' tutorial, FAQ, HOWTOs",
                 "code": "held-out stdlib modules"}  # fmt: skip


def setting(llm, policy: tuple[str, int | float] | None = None) -> dict:
    store = llm.engine.store
    budget = None if policy is None else policy[1]
    return {
        "model": llm.model_name,
        "kv_dtype": store.format.name,
        "kv_rotation": store.format.rotation,
        "kv_skip_layers": list(store.format.skip_layers),
        "kv_recent_tokens": store.format.residual_tokens or None,
        "kv_exact_sinks": bool(store.format.sink_blocks),
        "kv_policy": None if policy is None else policy[0],
        "kv_budget": f"{budget:.0%}" if isinstance(budget, float) else budget,
        "block_size": store.block_size,
        "bytes_per_token": store.bytes_per_token * llm.engine.tensor_parallel_size,
    }


def with_overrides(sizes: dict, args) -> dict:
    """A study's `sizes` with every one its command line gave (`args.<name>` not None;
    `lengths` and `depths` as comma-separated numbers), for the benchmarks/eval_* scripts."""
    sizes = dict(sizes)
    for name in sizes:
        value = getattr(args, name, None)
        if value is not None and name in ("lengths", "depths"):
            value = [(int if name == "lengths" else float)(x) for x in value.split(",")]
        if value is not None:
            sizes[name] = value
    return sizes


def use_policy(llm, policy: tuple[str, int | float] | None, tokens: int) -> int | None:
    """Make `policy` (name, budget in tokens or as a share of `tokens`) the engine's
    default for the next requests; returns the budget in tokens (None: no policy)."""
    if policy is None:
        llm.engine.kv_policy = None
        return None
    name, budget = policy
    if isinstance(budget, float):
        budget = max(1, round(budget * tokens))
    llm.engine.kv_policy = make_policy(name, budget)
    llm.engine.limits.check_policy(llm.engine.kv_policy)
    return budget


def kv_bytes(llm, tokens: int) -> int:
    """KV bytes one request of `tokens` tokens holds under this setting (every rank's)."""
    store = llm.engine.store
    ranks = llm.engine.tensor_parallel_size
    return ranks * bytes_per_request(store.spec, store.format, store.block_size, tokens)


# --- perplexity ---------------------------------------------------------------------------


def perplexity(llm, text: str | None = None, context: int = 1024, max_tokens: int = 16_384,
               chunk: int = 64, policy=None, corpus: str = "prose") -> dict:  # fmt: skip
    """Perplexity over windows of `context` tokens (each opened by BOS), up to `max_tokens`
    scored tokens of `text`, or else of `corpus` (`corpus.CORPORA`)."""
    source = CORPUS_LABELS.get(corpus, corpus) if text is None else "text"
    text = corpus_text(corpus) if text is None else text
    tokenizer = llm.engine.tokenizer
    ids = tokenizer.encode(text)  # with BOS, if the tokenizer adds one
    bos = ids[:1] if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else []
    body = ids[len(bos) :]
    step = context - len(bos)
    if step < 2:
        raise KVForgeError(f"context must be at least {len(bos) + 2} tokens, got {context}")
    budget = use_policy(llm, policy, context)
    total_nll, scored, windows, peak = 0.0, 0, 0, 0
    for start in range(0, len(body), step):
        take = min(step, max_tokens - scored + 1 - len(bos))  # never more than max_tokens
        window = bos + body[start : start + take]
        if len(window) < 2:
            break
        logprobs = llm.engine.score(window, chunk_size=chunk)
        peak = max(peak, llm.engine.last_score_peak_kv_tokens)
        total_nll -= float(logprobs.sum())
        scored += logprobs.numel()
        windows += 1
    if not scored:
        raise KVForgeError("the text is too short to score (fewer than 2 tokens)")
    return {
        "task": "perplexity",
        **setting(llm, policy),
        "kv_budget_tokens": budget,
        "source": source,
        "context": context,
        "chunk": chunk,
        "windows": windows,
        "tokens_scored": scored,
        "nll": total_nll / scored,
        "perplexity": math.exp(total_nll / scored),
        "peak_kv_tokens": peak,
        "kv_bytes_per_request": kv_bytes(llm, peak),
    }


# --- passkey ------------------------------------------------------------------------------


def default_lengths(llm, form: str | None = None) -> tuple[int, ...]:
    """1K, 2K, 4K, 8K up to the model's context (the last one its whole context, answer
    included); a model of at most 2,048 tokens gets `SHORT_LENGTHS`."""
    context = llm.engine.store.spec.max_position_embeddings
    answer = ANSWER_TOKENS if (form or default_form(llm)) == "colon" else CHAT_ANSWER_TOKENS
    if context <= 2048:
        return tuple(n for n in SHORT_LENGTHS if n + answer <= context)
    lengths = [n for n in LONG_LENGTHS if n < context] + [context]
    return tuple(min(n, context - answer) for n in lengths)


def default_form(llm) -> str:
    """ "chat" for a model with a chat template, else "colon" (kvforge-mini's)."""
    return "chat" if has_chat_template(llm.engine.tokenizer) else "colon"


def _encoder(llm, form: str):
    """Text -> prompt token ids: for "chat", a one-turn chat through the model's own
    template (KVForgeError for a model without one)."""
    tokenizer = llm.engine.tokenizer
    if form not in PASSKEY_FORMS:
        raise KVForgeError(f"unknown passkey form {form!r}; choose one of: "
                           f"{', '.join(PASSKEY_FORMS)}")  # fmt: skip
    if form != "chat":
        return tokenizer.encode
    if default_form(llm) != "chat":
        raise KVForgeError(f"passkey form 'chat' needs a model with a chat template; "
                           f"{llm.model_name} has none")  # fmt: skip
    return lambda text: chat_prompt(tokenizer, [{"role": "user", "content": text}])


def _answered(reply: str, key: str, form: str) -> bool:
    """Form "colon" must go on with the key; in the others the first number must be it."""
    if form == "colon":
        return reply.strip().startswith(key)
    numbers = re.findall(r"\d+", reply)
    return bool(numbers) and numbers[0] == key


def passkey(llm, lengths=None, depths=DEFAULT_DEPTHS, trials: int = 2, policy=None,
            form: str | None = None) -> dict:  # fmt: skip
    """Greedy passkey retrieval: accuracy[length][depth] over `trials` keys each; with
    `policy` (name, budget: tokens or a share of each length), under that policy. `form`
    (`PASSKEY_FORMS`; default: "chat" through the model's chat template when it has one,
    "What is the pass key?" answered in its own words, else "colon")."""
    from kvforge import SamplingParams

    form = form or default_form(llm)
    encode = _encoder(llm, form)
    answer_tokens = ANSWER_TOKENS if form == "colon" else CHAT_ANSWER_TOKENS
    lengths = default_lengths(llm, form) if lengths is None else tuple(lengths)
    limit = llm.engine.max_request_tokens - answer_tokens
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise KVForgeError(
            f"passkey length {too_long[0]} + {answer_tokens} answer tokens exceeds what one "
            f"request may hold ({limit + answer_tokens} tokens: context and KV pool)"
        )
    params = SamplingParams(max_tokens=answer_tokens, ignore_eos=form == "colon")
    hits: dict[tuple[int, float], int] = {}
    peaks: dict[int, int] = {}
    budgets: dict[str, int | None] = {}
    replies: dict[str, str] = {}
    for length in lengths:
        budgets[str(length)] = use_policy(llm, policy, length)
        cells, prompts = [], []
        for depth in depths:
            for trial in range(trials):
                seed = 1000 * length + round(100 * depth) * 10 + trial
                ids, key = passkey_prompt(encode, length, depth, seed, form)
                cells.append((depth, key))
                prompts.append(ids)
        outs = llm.generate(prompts, params)
        for (depth, key), out in zip(cells, outs, strict=True):
            right = _answered(out.text, key, form)
            hits[length, depth] = hits.get((length, depth), 0) + right
            peaks[length] = max(peaks.get(length, 0), out.metrics.peak_kv_tokens)
            if not right and str(length) not in replies:
                replies[str(length)] = f"key {key}: {out.text!r}"
    use_policy(llm, None, 0)
    grid = [[hits[n, d] / trials for d in depths] for n in lengths]
    return {
        "task": "passkey",
        **setting(llm, policy),
        "kv_budget_tokens": budgets,
        "form": form,
        "lengths": list(lengths),
        "depths": list(depths),
        "trials": trials,
        "accuracy": grid,
        "accuracy_by_length": {
            str(n): sum(row) / len(row) for n, row in zip(lengths, grid, strict=True)
        },
        "mean_accuracy": sum(map(sum, grid)) / (len(lengths) * len(depths)),
        "first_miss": replies,  # a wrong reply per length, to see how it failed
        "peak_kv_tokens": {str(n): peaks[n] for n in lengths},
        "kv_bytes_per_request": {str(n): kv_bytes(llm, peaks[n]) for n in lengths},
    }


def passkey_accuracy_up_to(result: dict, longest: int) -> float:
    """A `passkey` result's accuracy over the lengths up to `longest` tokens."""
    rows = [row for n, row in zip(result["lengths"], result["accuracy"], strict=True)
            if n <= longest]  # fmt: skip
    return sum(map(sum, rows)) / sum(map(len, rows))


def heat_map(result: dict, path) -> None:
    """The passkey grid as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise KVForgeError("the passkey heat map needs matplotlib: pip install matplotlib") from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(result["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context tokens")
    for i, row in enumerate(result["accuracy"]):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    title = f"passkey, kv_dtype {result['kv_dtype']}"
    if result.get("kv_policy"):
        title += f", {result['kv_policy']} budget {result['kv_budget']}"
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- agreement ----------------------------------------------------------------------------


def agreement_prompts(encode, count: int = 8, tokens: int = 256, corpus: str = "prose"
                      ) -> list[list[int]]:  # fmt: skip
    """The fixed prompt set: `count // 2` slices of `tokens` tokens spread evenly over
    `corpus`, then passkey documents."""
    ids = encode(corpus_text(corpus))
    take = count // 2
    stride = max(tokens, (len(ids) - tokens) // max(1, take))
    prompts = [ids[i : i + tokens] for i in range(0, len(ids) - tokens + 1, stride)][:take]
    seed = 0
    while len(prompts) < count:
        prompts.append(passkey_prompt(encode, tokens, 0.5 * (seed % 3) / 2, seed)[0])
        seed += 1
    return prompts


def agreement(llm, reference, count: int = 8, tokens: int = 256, new_tokens: int = 64,
              policy=None, corpus: str = "prose") -> dict:  # fmt: skip
    """Greedy token agreement and mean next-token KL of `llm` against `reference` (the same
    model with the full-precision, full cache)."""
    from kvforge.eval.quality import agreement as compare
    from kvforge.eval.quality import greedy_with_logprobs

    prompts = agreement_prompts(llm.engine.tokenizer.encode, count, tokens, corpus)
    budget = use_policy(llm, policy, tokens)
    peaks: list[int] = []
    ours = greedy_with_logprobs(llm, prompts, new_tokens, peaks)
    use_policy(llm, None, 0)
    peak = max(peaks)
    theirs = greedy_with_logprobs(reference, prompts, new_tokens)
    agree, kl = compare(ours, theirs)
    return {
        "task": "agreement",
        **setting(llm, policy),
        "kv_budget_tokens": budget,
        "reference_kv_dtype": reference.engine.store.format.name,
        "prompts": len(prompts),
        "prompt_tokens": tokens,
        "corpus": corpus,
        "new_tokens": new_tokens,
        "token_agreement": agree,
        "mean_kl": kl,
        "peak_kv_tokens": peak,
        "kv_bytes_per_request": kv_bytes(llm, peak),
    }
