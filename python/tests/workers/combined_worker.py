"""One worker process with the three kinds of endpoint of python-sdk spec §10: a Text-input chat
model (the frontend forwards the OpenAI request; this answers chat chunks), a Tokens-input model (the
frontend tokenizes), and a plain endpoint for SDK clients.

Run: python combined_worker.py MODEL_DIR   (namespace from $DYN_NAMESPACE, default "dynamo")
"""
import asyncio
import os
import sys
import time
import uuid

from dynamix.llm import ModelInput, ModelType, WorkerType, lora_name_to_id, register_model
from dynamix.llm.exceptions import HttpError
from dynamix.runtime import dynamo_worker
from dynamix.runtime.logging import configure_dynamo_logging

MODEL_DIR = sys.argv[1]
NS = os.environ.get("DYN_NAMESPACE", "dynamo")


class ReverseBot:
    """Answers the last user message with its words reversed, one chunk per word."""

    async def generate(self, request, context):
        user_turns = [m for m in request["messages"] if m.get("role") == "user"]
        if not user_turns:
            raise ValueError("no user message")
        text = str(user_turns[-1]["content"])
        if text == "forbidden":
            raise HttpError(403, "not allowed")
        if text == "missing":
            raise HttpError(404, "no such conversation")
        words = text.split()[::-1]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request["model"]}
        if text == "call a tool":
            # A tool call streamed in pieces, as OpenAI-style engines do.
            pieces = [{"index": 0, "id": "call_1", "type": "function",
                       "function": {"name": "lookup", "arguments": '{"x": '}},
                      {"index": 0, "function": {"arguments": "1}"}}]
            for piece in pieces:
                yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [piece]},
                                            "finish_reason": None}]}
            yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
            return
        for i, word in enumerate(words):
            if word == "explode":
                raise RuntimeError("exploded mid-stream")
            if context.is_stopped():
                return
            if request["model"] == "reverse-bot-loud":  # the LoRA adapter
                word = word.upper()
            delta = {"content": word + (" " if i + 1 < len(words) else "")}
            if i == 0:
                delta["role"] = "assistant"
            yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await asyncio.sleep(0.01)
        usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(words),
                 "total_tokens": len(text.split()) + len(words)}
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
               "usage": usage}


async def tokens(request, context):
    budget = request["stop_conditions"].get("max_tokens") or 16
    answer = [t for t in request["token_ids"] if t < 256][:budget]
    for token in answer:
        yield {"token_ids": [token]}
    yield {"token_ids": [], "finish_reason": "length" if len(answer) == budget else "stop"}


async def greet(names):
    for name in names.split(","):
        yield f"hello, {name.strip()}"


@dynamo_worker()
async def main(runtime):
    configure_dynamo_logging()
    text = runtime.endpoint(f"{NS}.reverse.generate")
    toks = runtime.endpoint(f"{NS}.backend.generate")
    plain = runtime.endpoint(f"{NS}.greeter.generate")
    common = dict(worker_type=WorkerType.Aggregated)
    await register_model(ModelInput.Text, ModelType.Chat, text, "reverse-bot",
                         model_name="reverse-bot", skip_model_assets=True, **common)
    await register_model(ModelInput.Text, ModelType.Chat, text, "reverse-bot",
                         model_name="reverse-bot", lora_name="reverse-bot-loud",
                         base_model_path="reverse-bot", skip_model_assets=True,
                         user_data={"lora_adapter": True,
                                    "lora_id": lora_name_to_id("reverse-bot-loud")}, **common)
    await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, toks,
                         MODEL_DIR, model_name="tiny", **common)
    print("worker ready", flush=True)
    await asyncio.gather(text.serve_endpoint(ReverseBot().generate),
                         toks.serve_endpoint(tokens), plain.serve_endpoint(greet))


asyncio.run(main())
