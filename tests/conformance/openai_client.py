"""Conformance of dynamix with the official `openai` Python SDK.

Run by tests/openai_conformance.rs against a live server:
    python3 openai_client.py BASE_URL MODEL [EMBEDDING_MODEL]
The SDK parses every response and chunk with its pydantic models, so schema mistakes fail here.
Exits non-zero with a message on the first failure; prints one line per check.
"""

import base64
import math
import struct
import sys

import openai
from openai import OpenAI


def check(name, condition, detail=""):
    if not condition:
        print(f"FAIL {name}: {detail}", flush=True)
        sys.exit(1)
    print(f"ok   {name}", flush=True)


def expect_error(name, exc_type, status, call):
    try:
        call()
    except exc_type as e:
        check(name, e.status_code == status, f"status {e.status_code}, body {e.body}")
        return e
    except Exception as e:  # noqa: BLE001 - report the wrong type
        check(name, False, f"raised {type(e).__name__}: {e}")
    check(name, False, "no error raised")


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=30)

    models = client.models.list()
    ids = [m.id for m in models.data]
    check("models.list", model in ids, ids)
    check("models.retrieve", client.models.retrieve(model).id == model)

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello, SDK!"}], max_tokens=64
    )
    check("chat unary content", chat.choices[0].message.content == "Hello, SDK!", chat)
    check("chat unary finish_reason", chat.choices[0].finish_reason == "stop", chat.choices[0].finish_reason)
    check("chat unary usage", chat.usage.completion_tokens == 11 and chat.usage.total_tokens
          == chat.usage.prompt_tokens + 11, chat.usage)
    check("chat unary object", chat.object == "chat.completion" and chat.id.startswith("chatcmpl-"), chat.id)

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream ✓ me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    check("chat stream text", text == "stream ✓ me", repr(text))
    check("chat stream finish_reason", finish == "stop", finish)
    check("chat stream include_usage", usage is not None and usage.completion_tokens == len("stream ✓ me"), usage)

    length = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "truncate this"}], max_completion_tokens=3
    )
    check("chat max_completion_tokens", length.choices[0].message.content == "tru"
          and length.choices[0].finish_reason == "length", length.choices[0])

    extra = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "abc"}], extra_body={"ignore_eos": True, "top_k": 5}
    )
    check("chat extra_body extensions", extra.choices[0].message.content == "abc")

    completion = client.completions.create(model=model, prompt="complete me", max_tokens=8)
    check("completions unary", completion.choices[0].text == "complete"
          and completion.choices[0].finish_reason == "length", completion.choices[0])
    check("completions usage", completion.usage.completion_tokens == 8, completion.usage)

    pieces, usage = [], None
    for chunk in client.completions.create(model=model, prompt="xyz", stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        pieces += [c.text for c in chunk.choices]
    check("completions stream", "".join(pieces) == "xyz", pieces)
    check("completions stream usage", usage is not None and usage.completion_tokens == 3, usage)

    response = client.responses.create(model=model, input="respond", max_output_tokens=16)
    check("responses unary", response.output_text == "respond", response)
    events = [e.type for e in client.responses.create(model=model, input="ev", stream=True)]
    check("responses stream", events[0] == "response.created" and events[-1] == "response.completed"
          and events.count("response.output_text.delta") == 2, events)

    # Errors surface as the SDK's typed exceptions.
    expect_error("404 NotFoundError", openai.NotFoundError, 404, lambda: client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "x"}]))
    err = expect_error("400 BadRequestError", openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], temperature=3))
    check("400 message", "Temperature must be between 0 and 2" in str(err), str(err))
    expect_error("400 empty messages", openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=model, messages=[]))
    expect_error("400 unknown field", openai.BadRequestError, 400, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], extra_body={"bogus_field": 1}))
    expect_error("501 functions", openai.InternalServerError, 501, lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], functions=[{"name": "f", "parameters": {}}]))
    expect_error("404 models.retrieve", openai.NotFoundError, 404, lambda: client.models.retrieve("nope"))

    if len(sys.argv) > 3:
        embeddings(client, sys.argv[3])
    print("conformance: all checks passed", flush=True)


def embeddings(client, model):
    check("embeddings models.list", model in [m.id for m in client.models.list().data])
    check("embeddings models.retrieve", client.models.retrieve(model).id == model)

    sentences = ["A cat sits on the mat", "A kitten is lying on a rug", "Quarterly revenue grew by eight percent"]
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    default = client.embeddings.create(model=model, input=sentences[0])
    check("embeddings default object", default.object == "list" and default.model == model
          and default.data[0].object == "embedding" and default.data[0].index == 0, default)
    vector = default.data[0].embedding
    check("embeddings default 384 floats", len(vector) == 384 and all(isinstance(v, float) for v in vector))
    check("embeddings unit norm", abs(math.sqrt(sum(v * v for v in vector)) - 1) < 1e-4)
    check("embeddings usage", default.usage.prompt_tokens == 8 and default.usage.total_tokens == 8, default.usage)

    floats = client.embeddings.create(model=model, input=sentences, encoding_format="float")
    check("embeddings float indices", [d.index for d in floats.data] == [0, 1, 2], floats.data)
    check("embeddings float = default", max(abs(a - b) for a, b in zip(floats.data[0].embedding, vector)) < 1e-6)
    cat, kitten, revenue = (d.embedding for d in floats.data)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731 - unit vectors
    check("embeddings semantics", cos(cat, kitten) > cos(cat, revenue), (cos(cat, kitten), cos(cat, revenue)))

    raw = client.embeddings.create(model=model, input=sentences[0], encoding_format="base64")
    encoded = raw.data[0].embedding
    check("embeddings base64 is a string", isinstance(encoded, str), type(encoded))
    decoded = struct.unpack("<384f", base64.b64decode(encoded))
    check("embeddings base64 = float", max(abs(a - b) for a, b in zip(decoded, cat)) < 1e-6)

    tokens = client.embeddings.create(model=model, input=[[101, 1037, 4937, 7719, 2006, 1996, 13523, 102]],
                                      encoding_format="float")
    check("embeddings token ids", max(abs(a - b) for a, b in zip(tokens.data[0].embedding, cat)) < 1e-5)

    err = expect_error("embeddings 400 dimensions", openai.BadRequestError, 400,
                       lambda: client.embeddings.create(model=model, input="x", dimensions=128))
    check("embeddings 400 message", "dimensions = 128" in str(err) and model in str(err), str(err))
    expect_error("embeddings 404 model", openai.NotFoundError, 404,
                 lambda: client.embeddings.create(model="no-such-model", input="x"))


if __name__ == "__main__":
    main()
