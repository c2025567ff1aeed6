"""The OpenAI wire format: request bodies (validated strictly) and response objects.

Types are strict: `"max_tokens": "5"` is a wrong type, not 5. Fields OpenAI
clients send that kvforge does not act on (`user`, `metadata`, ...) are
ignored; fields that would change the result and are not supported (`n` > 1,
`logprobs`, `echo`, penalties) are refused with a message naming them, never
silently dropped.
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from kvforge.engine.sampling import SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.policy import KVPolicy, make_policy

OPENAI_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default; send 0 for greedy
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


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
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension (vLLM has it too); 0 or -1 = all tokens
    ignore_eos: bool = False  # an extension (vLLM too): generate max_tokens whatever comes
    # an extension (vLLM too): requests with different salts never share prefix-cache
    # blocks, so one tenant cannot learn from timing what another sent
    cache_salt: str | None = Field(default=None, min_length=1)
    # an extension: this request's eviction policy and budget (default: the server's)
    kv_policy: str | None = None
    kv_budget: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def _refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n must be 1 (got {self.n}): one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name} is not supported; send 0 or leave it out", param=name)

    def kv_policy_choice(self) -> KVPolicy | None:
        """The request's own eviction policy (None: the server's); a 400 names a bad one."""
        if self.kv_policy is None and self.kv_budget is None:
            return None
        try:
            return make_policy(self.kv_policy, self.kv_budget)
        except KVForgeError as exc:
            raise APIError(400, str(exc), param="kv_policy") from None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The engine's parameters; KVForgeError (a 400) names a value out of range."""
        self._refuse_unsupported()
        if max_tokens <= 0:
            raise APIError(
                400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens"
            )
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
                ignore_eos=self.ignore_eos,
            )
        except KVForgeError as exc:
            raise APIError(400, str(exc)) from None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.logprobs is not None:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")


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
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    logprobs: bool = False

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_object(rid: str, model: str, text: str, finish: str | None, use: dict | None):
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": use,
    }


def chat_object(rid: str, model: str, text: str, finish: str | None, use: dict | None):
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": use,
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
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
