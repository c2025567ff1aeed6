"""The OpenAI wire format: request bodies (validated strictly) and response objects.

Types are strict: `"max_tokens": "5"` is a wrong type, not 5. Fields OpenAI
clients send that kvforge does not act on (`user`, `metadata`, ...) are
ignored; fields that would change the result and are not supported (`suffix`)
are refused with a message naming them, never silently dropped. Limits are part
of the models (so of the OpenAPI schema); the server's own (`--max-logprobs`,
`--max-prompts-per-request`) are checked by the handlers and named in the 400.
"""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvforge.engine.sampling import MAX_LOGIT_BIAS, MAX_PENALTY, SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.policy import KVPolicy, make_policy

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send 0 for greedy
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_N = 128  # choices a request may ask for (n, best_of)


class APIError(Exception):
    """An error answered with an OpenAI-style error object and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # an extension (vLLM too); 0 or -1 = all
    ignore_eos: bool = False  # an extension (vLLM too): generate max_tokens whatever comes
    # an extension (vLLM too): requests with different salts never share prefix-cache
    # blocks, so one tenant cannot learn from timing what another sent
    cache_salt: str | None = Field(default=None, min_length=1)
    # an extension: this request's eviction policy and budget (default: the server's)
    kv_policy: str | None = None
    kv_budget: int | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # an extension (vLLM too)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(default=1.0, gt=0)  # an extension (vLLM too)
    min_tokens: int = Field(default=0, ge=0)  # an extension (vLLM too)
    # token id (as a string, as OpenAI sends it) -> bias added to its logit
    logit_bias: dict[str, float] | None = None
    # an extension (vLLM too): log-probabilities name tokens "token_id:N", not by their text
    return_tokens_as_token_ids: bool = False

    def kv_policy_choice(self) -> KVPolicy | None:
        """The request's own eviction policy (None: the server's); a 400 names a bad one."""
        if self.kv_policy is None and self.kv_budget is None:
            return None
        try:
            return make_policy(self.kv_policy, self.kv_budget)
        except KVForgeError as exc:
            raise APIError(400, str(exc), param="kv_policy") from None

    def _logit_bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        bias = {}
        for key, value in self.logit_bias.items():
            if not key.isdigit() or not abs(value) <= MAX_LOGIT_BIAS:
                raise APIError(
                    400,
                    f"logit_bias maps token ids to numbers in [-100, 100], got {key!r}: {value!r}",
                    param="logit_bias",
                )
            bias[int(key)] = value
        return bias

    def sampling_params(self, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None) -> SamplingParams:  # fmt: skip
        """The engine's parameters; KVForgeError (a 400) names a value out of range."""
        top_k = self.top_k if self.top_k not in (None, -1) else 0
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=(
                    OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
                ),
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=top_k,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                min_tokens=self.min_tokens,
                logit_bias=self._logit_bias(),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except KVForgeError as exc:
            message = str(exc)
            param = message.split(" ", 1)[0].split("[", 1)[0]
            raise APIError(
                400, message, param=param if param in type(self).model_fields else None
            ) from None


class CompletionRequest(_SamplingRequest):
    # a string, a list of strings, a list of token ids, or a list of token-id lists:
    # one choice (n of them) per prompt, in order
    # (items are checked by `prompts`, which names the empty one; the OpenAPI schema has
    # their limits too: see `build_app`)
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[str], Field(min_length=1)]
             | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[list[int]], Field(min_length=1)])  # fmt: skip
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice group; a 400 names an empty one."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        for i, one in enumerate(prompts):
            if len(one) == 0:
                raise APIError(400, f"prompt {i} is empty", param="prompt")
        return prompts

    def check(self, max_tokens: int) -> None:
        """What the fields say together (400s naming them)."""
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if max_tokens == 0 and not self.echo:
            raise APIError(
                400,
                "max_tokens must be at least 1, got 0 (0 only with echo: to score the prompt)",
                param="max_tokens",
            )
        best_of = self.best_of or self.n
        if best_of < self.n:
            raise APIError(
                400, f"best_of ({best_of}) must be at least n ({self.n})", param="best_of"
            )
        if self.stream and best_of > self.n:
            raise APIError(400, "best_of cannot be used with stream", param="best_of")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, str]:
        """The message as chat templates take it."""
        return {"role": self.role, "content": self.text}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)

    def check(self) -> None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.max_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1, got 0", param="max_tokens")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          shared_tokens: int = 0) -> dict:  # fmt: skip
    """OpenAI's usage; `shared_between_samples` (an extension): prompt tokens the n > 1 or
    best_of samples of a prompt took from its first sample's KV blocks, not computed."""
    details = {"cached_tokens": cached_tokens}
    if shared_tokens:
        details["shared_between_samples"] = shared_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": details,
    }


def finite(logprob: float) -> float:
    """JSON has no -inf: a log-probability of 0 probability is sent as -9999.0 (vLLM too)."""
    return max(logprob, -9999.0)


def completion_logprobs(token_ids: list[int], entries: list, text_of, offset: int = 0) -> dict:
    """The completions API's `logprobs` object for a run of tokens: `entries` are their
    TokenLogprobs (None for a first prompt token, which has no context); `text_of` maps a
    token id to its text; offsets count characters from `offset`."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token_id, entry in zip(token_ids, entries, strict=True):
        text = text_of(token_id)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            token_logprobs.append(finite(entry.logprob))
            top = {text_of(t): finite(lp) for t, lp in entry.top}
            top.setdefault(text, finite(entry.logprob))  # the chosen token is always there
            top_logprobs.append(top)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": text_offset}  # fmt: skip


def chat_logprobs(entries: list, text_of) -> dict:
    """The chat API's `logprobs` object: one `content` item per generated token."""

    def item(token_id: int, logprob: float) -> dict:
        text = text_of(token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}

    return {
        "content": [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
            for e in entries
        ]
    }


def completion_object(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    """`choices`: {index, text, logprobs, finish_reason} each."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def completion_choice(index: int, text: str, logprobs: dict | None, finish: str | None):
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": logprobs,
        "finish_reason": finish,
    }


def chat_object(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: str | None,
               logprobs: dict | None = None) -> dict:  # fmt: skip
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        ],
    }


def usage_chunk(rid: str, model: str, kind: str, use: dict) -> dict:
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }
