"""llama.cpp as a benchmark peer, through llama-cpp-python, on a GGUF export of our checkpoint.

The GGUF file comes from `kvforge.models.gguf_export.export_gguf`, whose
vocabulary is a placeholder: prompts are token ids, never text, and decoding
is greedy over the raw logits with EOS ignored, so llama.cpp produces exactly
the tokens kvforge and transformers do on the same weights.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kvforge.errors import KVForgeError

SKIP_MESSAGE = (
    "llama.cpp peer skipped: pip install 'kvforge[peers]' "
    "(builds llama-cpp-python from source, ~7 min)"
)


def llamacpp_available() -> str | None:
    """None when llama-cpp-python can be imported, else the line a benchmark prints instead."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return SKIP_MESSAGE
    return None


class LlamaCppEngine:
    """One llama.cpp model and context, generating greedily from token-id prompts.

    llama-cpp-python's `Llama` serves one sequence at a time (one context, one
    KV cache), so a benchmark at concurrency c runs its c requests one after
    another; its throughput is llama.cpp's single-sequence speed. Each prompt
    starts from an empty KV cache: no prefix is reused between prompts.
    """

    name = "llama.cpp"

    def __init__(
        self, gguf_path: str | Path, n_ctx: int, n_threads: int | None = None, n_batch: int = 512
    ) -> None:
        import llama_cpp
        from llama_cpp import Llama

        if n_ctx <= 0 or n_batch <= 0:
            raise KVForgeError(f"n_ctx and n_batch must be positive, got {n_ctx} and {n_batch}")
        self.n_ctx = n_ctx
        self.llm = Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_threads=n_threads,
            logits_all=False,  # logits of the last position only
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()
        self._llama_cpp = llama_cpp  # the low-level bindings, for the logits

    def generate_greedy(
        self,
        prompt_token_ids: list[int],
        max_tokens: int,
        on_token: Callable[[], None] | None = None,
    ) -> list[int]:
        """Exactly `max_tokens` argmax tokens after the prompt (EOS is not special);
        `on_token` is called as each token is chosen (for per-token timing)."""
        prompt_len = len(prompt_token_ids)
        if prompt_len == 0 or max_tokens <= 0:
            raise KVForgeError("a prompt needs at least one token and max_tokens must be positive")
        if prompt_len + max_tokens > self.n_ctx:
            raise KVForgeError(
                f"prompt_len {prompt_len} + max_tokens {max_tokens} exceeds n_ctx {self.n_ctx}"
            )
        bad = [t for t in prompt_token_ids if not 0 <= t < self.n_vocab]
        if bad:
            raise KVForgeError(f"token ids {bad[:5]} are outside the vocabulary of {self.n_vocab}")

        self.llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        self.llm.eval(prompt_token_ids)
        output: list[int] = []
        while True:
            output.append(int(np.argmax(self._last_logits())))
            if on_token is not None:
                on_token()
            if len(output) == max_tokens:
                return output
            self.llm.eval(output[-1:])

    def _last_logits(self) -> np.ndarray:  # [n_vocab] float32, a view into llama.cpp's buffer
        # With logits_all=False, `Llama.eval` (0.3.x) no longer copies logits into
        # `Llama.scores`, so read the last position's row from the context itself.
        pointer = self._llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def close(self) -> None:
        """Free the model and context now rather than at garbage collection."""
        self.llm.close()
