"""A Tokens model whose stand-in engine continues any sequence the same way: the next token is the
letter at (sequence length mod 26) of the alphabet, one step every 30 ms. A request migrated to
another worker (the frontend resends the prompt plus what was produced) therefore continues exactly
where the dead worker stopped. At the start of each request it writes a file named after its pid into
$SERVING_MARKER_DIR, so a test knows which worker to kill.

Run: python alphabet_worker.py MODEL_DIR
"""
import asyncio
import os
import sys

from dynamix.llm import ModelInput, ModelType, WorkerType, register_model
from dynamix.runtime import dynamo_worker

ALPHABET = b"abcdefghijklmnopqrstuvwxyz"


async def generate(request, context):
    marker = os.environ.get("SERVING_MARKER_DIR")
    if marker:
        open(os.path.join(marker, str(os.getpid())), "w").close()
    sequence = list(request["token_ids"])
    budget = request["stop_conditions"].get("max_tokens") or 16
    for _ in range(budget):
        if context.is_stopped():
            return
        token = ALPHABET[len(sequence) % 26]
        sequence.append(token)
        yield {"token_ids": [token]}
        await asyncio.sleep(0.03)
    yield {"token_ids": [], "finish_reason": "length"}


@dynamo_worker()
async def main(runtime):
    endpoint = runtime.endpoint(os.environ.get("ENDPOINT", "dynamo.backend.generate"))
    await register_model(ModelInput.Tokens, ModelType.Chat | ModelType.Completions, endpoint,
                         sys.argv[1], model_name="tiny", worker_type=WorkerType.Aggregated)
    print("worker ready", flush=True)
    await endpoint.serve_endpoint(generate)


asyncio.run(main())
