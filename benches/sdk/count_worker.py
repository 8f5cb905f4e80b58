"""The worker of scripts/sdk-bench.sh, written for Dynamo 1.6.1 (imports `dynamo.*`): run it with
Dynamo's Python, or unchanged under dynamix with `python -m dynamix.compat count_worker.py MODEL_DIR`.

It registers a Text chat model, `count-bot`, whose handler yields `max_tokens` (default 200) chat
chunks of one word each as fast as it can, so items/s measures the path frontend -> Python worker ->
client, not an engine. A Tokens model (`tiny`, MODEL_DIR) rides along: a dynamix frontend takes its
own model from the first Tokens card on its endpoint.
"""
import asyncio
import os
import sys
import time

from dynamo.llm import ModelInput, ModelType, WorkerType, register_model
from dynamo.runtime import DistributedRuntime, dynamo_worker

NS = os.environ.get("DYN_NAMESPACE", "dynamo")


async def count(request, context):
    n = request.get("max_tokens") or request.get("max_completion_tokens") or 200
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": request["model"]}
    for i in range(n):
        if context.is_stopped():
            return
        yield {**base, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}


async def tokens(request, context):
    yield {"token_ids": [], "finish_reason": "stop"}


@dynamo_worker()
async def main(runtime: DistributedRuntime):
    text = runtime.endpoint(f"{NS}.count.generate")
    toks = runtime.endpoint(f"{NS}.backend.generate")
    await register_model(ModelInput.Text, ModelType.Chat, text, "count-bot", "count-bot",
                         worker_type=WorkerType.Aggregated, skip_model_assets=True)
    await register_model(ModelInput.Tokens, ModelType.Chat, toks, sys.argv[1], "tiny",
                         worker_type=WorkerType.Aggregated)
    print("worker ready", flush=True)
    await asyncio.gather(text.serve_endpoint(count), toks.serve_endpoint(tokens))


asyncio.run(main())
