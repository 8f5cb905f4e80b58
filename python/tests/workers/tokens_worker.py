"""A Tokens-input model (python-sdk spec §8.3): the frontend tokenizes; this worker answers with
the prompt's own token ids, one per step, as a stand-in engine. Prompts containing "please fail"
raise ValueError (HTTP 400); "go slow" makes each step take 50 ms, and a stopped request leaves a
marker file in $STOP_MARKER_DIR. With $LORA_NAME it also registers that LoRA adapter (§6.3): the
adapter's answers are the prompt's last tokens instead of its first, and a request that says
"drop the adapter" unregisters it. $MODEL_ALIASES (comma-separated) are the model's other names.

Run: python tokens_worker.py MODEL_DIR   (imports dynamix; the compat test rewrites them to dynamo)
"""
import asyncio
import os
import sys

from dynamix.llm import (ModelInput, ModelType, WorkerType, lora_name_to_id, register_model,
                         unregister_model)
from dynamix.runtime import dynamo_worker
from dynamix.runtime.logging import configure_dynamo_logging

MODEL_DIR = sys.argv[1]
NAME = os.environ.get("MODEL_NAME", "tiny")
LORA = os.environ.get("LORA_NAME")
ALIASES = [a for a in os.environ.get("MODEL_ALIASES", "").split(",") if a]
ENDPOINT = None


def text_of(tokens):
    return bytes(t for t in tokens if t < 256).decode("latin-1")


async def generate(request, context):
    prompt = request["token_ids"]
    text = text_of(prompt)
    if "please fail" in text:
        raise ValueError("the prompt asked to fail")
    budget = request["stop_conditions"].get("max_tokens") or 16
    slow = "go slow" in text
    adapter = (request.get("routing") or {}).get("lora_name")
    if adapter is not None and adapter != request["model"]:
        raise ValueError(f"routing.lora_name {adapter!r} is not the model {request['model']!r}")
    if adapter is not None and "drop the adapter" in text:
        await unregister_model(ENDPOINT, lora_name=adapter)
    # The prompt without its special tokens: "user\n{content}\nassistant\n" for one user turn.
    plain = [t for t in prompt if t < 256]
    answer = plain[-budget:] if adapter else plain[:budget]
    for i, token in enumerate(answer):
        if context.is_stopped():
            marker = os.environ.get("STOP_MARKER_DIR")
            if marker:
                with open(os.path.join(marker, context.id()), "w") as f:
                    f.write("stopped")
            return
        yield {"token_ids": [token]}
        if slow:
            await asyncio.sleep(0.05)
    yield {"token_ids": [], "finish_reason": "length" if len(answer) == budget else "stop"}


@dynamo_worker()
async def main(runtime):
    configure_dynamo_logging()
    global ENDPOINT
    endpoint = ENDPOINT = runtime.endpoint(os.environ.get("ENDPOINT", "dynamo.backend.generate"))
    await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, endpoint,
                         MODEL_DIR, model_name=NAME, worker_type=WorkerType.Aggregated,
                         kv_cache_block_size=16, model_aliases=ALIASES or None)
    if LORA:
        await register_model(ModelInput.Tokens, ModelType.Chat, endpoint, MODEL_DIR,
                             model_name=NAME, lora_name=LORA, base_model_path=MODEL_DIR,
                             user_data={"lora_adapter": True, "lora_id": lora_name_to_id(LORA)},
                             worker_type=WorkerType.Aggregated, kv_cache_block_size=16)
    print("worker ready", flush=True)
    await endpoint.serve_endpoint(generate)


asyncio.run(main())
