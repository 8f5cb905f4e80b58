"""python-sdk spec §8.2, as written there (namespace from $DYN_NAMESPACE): a Text-input chat model
alone; the frontend forwards the OpenAI request and streams the chunks back."""
import asyncio
import os
import time
import uuid

from dynamix.llm import ModelInput, ModelType, WorkerType, register_model
from dynamix.runtime import dynamo_worker


class ReverseBot:
    async def generate(self, request, context):
        user_turns = [m for m in request["messages"] if m.get("role") == "user"]
        if not user_turns:
            raise ValueError("no user message")          # -> HTTP 400
        words = str(user_turns[-1]["content"]).split()[::-1]
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": request["model"]}
        for i, word in enumerate(words):
            if context.is_stopped():                      # client went away
                return
            delta = {"content": word + (" " if i + 1 < len(words) else "")}
            if i == 0:
                delta["role"] = "assistant"
            yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await asyncio.sleep(0.02)
        yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}


@dynamo_worker()
async def main(runtime):
    endpoint = runtime.endpoint(f"{os.environ.get('DYN_NAMESPACE', 'demo')}.reverse.generate")
    await register_model(ModelInput.Text, ModelType.Chat, endpoint, "reverse-bot",
                         model_name="reverse-bot", worker_type=WorkerType.Aggregated,
                         skip_model_assets=True)   # a bare name: no files to read
    print("worker ready", flush=True)
    await endpoint.serve_endpoint(ReverseBot().generate)


asyncio.run(main())
