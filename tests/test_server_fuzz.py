"""The server's OpenAPI schema is what it accepts, and no body breaks it: hypothesis
generates bodies from the schema of every POST route (`from_schema`: JSON Schema's
keywords that FastAPI writes), mutates them (a field replaced by any JSON value, a field
dropped) and sends raw junk, over loopback to a real server. Every answer is a 2xx or a
4xx OpenAI error object — never a 500, a hang or a dropped connection — and the block
pool is whole afterwards. Bodies that ask for a lot of work (max_tokens, n, best_of,
min_tokens) are capped, so the 1,000 bodies take a few minutes (a slow test; derandomized,
so a run is reproducible).
"""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_server import MODEL, Server, new_llm

EXAMPLES = 1000
WORK = {"max_tokens": 6, "max_completion_tokens": 6, "n": 3, "best_of": 3, "min_tokens": 6}
ROUTES = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
}


@pytest.fixture(scope="module")
def server():
    s = Server(new_llm(kv_memory="2MiB"))
    yield s
    s.close()


def _schema(app) -> dict:
    return app.openapi()


def test_the_schema_has_every_field_type_and_limit(server):
    models = _schema(server.app)["components"]["schemas"]
    completion = models["CompletionRequest"]["properties"]
    assert {"prompt", "echo", "logprobs", "n", "best_of", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_tokens", "logit_bias", "stop", "seed",
            "stream"} <= set(completion)  # fmt: skip
    assert completion["logprobs"]["anyOf"][0] == {"type": "integer", "minimum": 0,
                                                   "maximum": 20}  # fmt: skip
    assert completion["presence_penalty"]["minimum"] == -2
    assert completion["presence_penalty"]["maximum"] == 2
    assert completion["repetition_penalty"]["exclusiveMinimum"] == 0
    assert completion["n"]["maximum"] == 128 and completion["n"]["minimum"] == 1
    several = [f for f in completion["prompt"]["anyOf"] if f.get("maxItems")]
    assert all(f["maxItems"] == 64 for f in several) and len(several) == 2
    chat = models["ChatCompletionRequest"]["properties"]
    assert chat["top_logprobs"]["anyOf"][0]["maximum"] == 20
    assert models["ChatCompletionRequest"]["required"] == ["model", "messages"]


def _capped(body):
    if isinstance(body, dict):
        for key, most in WORK.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                body[key] = most
    return body


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=10,
)  # fmt: skip


def from_schema(node: dict, components: dict) -> st.SearchStrategy:
    """Values that `node` (a JSON Schema, OpenAPI's flavour) accepts."""
    if "$ref" in node:
        return st.deferred(lambda: from_schema(components[node["$ref"].rsplit("/", 1)[1]],
                                               components))  # fmt: skip
    if "anyOf" in node:
        return st.one_of([from_schema(n, components) for n in node["anyOf"]])
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(
            min_size=node.get("minLength", 0), max_size=max(node.get("minLength", 0), 24)
        )
    if kind in ("integer", "number"):
        low, high = node.get("minimum"), node.get("maximum")
        if kind == "integer":
            low = None if low is None else int(low)
            high = None if high is None else int(high)
            return st.integers(low, high)
        above = node.get("exclusiveMinimum")
        return st.floats(low if above is None else above, high, allow_nan=False,
                         allow_infinity=False, exclude_min=above is not None)  # fmt: skip
    if kind == "array":
        least = node.get("minItems", 0)
        return st.lists(from_schema(node.get("items", {}), components), min_size=least,
                        max_size=min(node.get("maxItems", 4), max(least, 4)))  # fmt: skip
    if kind == "object" or "properties" in node:
        properties = node.get("properties", {})
        required = set(node.get("required", ()))
        if not properties:  # a map: keys are text
            values = node.get("additionalProperties", {})
            values = values if isinstance(values, dict) else {}
            return st.dictionaries(st.text(max_size=6), from_schema(values, components), max_size=3)
        return st.fixed_dictionaries(
            {k: from_schema(v, components) for k, v in properties.items() if k in required},
            optional={k: from_schema(v, components) for k, v in properties.items()
                      if k not in required},
        )  # fmt: skip
    return JSON  # no constraint


def _bodies(schema: dict):
    """(route, body bytes): valid bodies, mutated ones, and junk."""
    strategies = []
    for route, name in ROUTES.items():
        components = schema["components"]["schemas"]
        valid = from_schema(components[name], components).map(_capped)
        if "model" in schema["components"]["schemas"][name]["properties"]:
            valid = valid.map(lambda b: {**b, "model": MODEL} if isinstance(b, dict) else b)

        def mutate(draw_body, key, value, drop):
            body = dict(draw_body)
            if body:
                field = sorted(body)[key % len(body)]
                if drop:
                    body.pop(field)
                else:
                    body[field] = value
            return _capped(body)

        mutated = st.builds(mutate, valid, st.integers(0, 50), JSON, st.booleans())
        for strategy in (valid, valid, mutated):
            encoded = strategy.map(lambda b: json.dumps(b).encode())
            strategies.append(st.tuples(st.just(route), encoded))
        junk = st.binary(max_size=64) | JSON.map(lambda b: json.dumps(b).encode())
        strategies.append(st.tuples(st.just(route), junk))
    return st.one_of(strategies)


def _check(response: httpx.Response, body: bytes) -> None:
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert error["message"], response.text
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", (body, response.text[-500:])
        for event in events[:-1]:
            assert "server_error" not in event, (body, event)
    else:
        response.json()


@pytest.mark.slow
def test_generated_and_malformed_bodies_never_break_the_server(server):
    sent = []
    client = httpx.Client(base_url=server.url, timeout=60)

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(_bodies(_schema(server.app)))
    def send(case):
        route, body = case
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        sent.append(response.status_code)
        _check(response, body)

    try:
        send()
    finally:
        client.close()
    assert len(sent) >= 1000
    assert any(200 <= s < 300 for s in sent) and any(400 <= s < 500 for s in sent)
    server.wait_idle()  # every block back in the pool, the pool's invariants hold
    stats = server.engine.kv_stats()
    assert stats["blocks_free"] == stats["blocks_total"]
