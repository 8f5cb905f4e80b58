"""A worker written for Dynamo 1.6.1 the way its vLLM backend (`dynamo.vllm.main`) is: `dynamo.*`
imports, a handler class over an engine, a `ModelRuntimeConfig` filled from the engine's cache
info, `register_model` with every keyword the vLLM backend passes, and `serve_endpoint` with
metrics labels and a health-check payload. Only the engine is a stand-in (it echoes the prompt's
bytes at a fixed pace), so the script runs unmodified under `python -m dynamix.compat`.

Run: python -m dynamix.compat vllm_style_worker.py --model-path DIR --served-model-name NAME
"""
import argparse
import asyncio
import logging
import os

from dynamo.llm import (ModelInput, ModelRuntimeConfig, ModelType, WorkerType,
                        register_model)
from dynamo.runtime import DistributedRuntime, dynamo_worker
from dynamo.runtime.logging import configure_dynamo_logging

configure_dynamo_logging()
logger = logging.getLogger(__name__)


class EchoEngine:
    """Stands in for vLLM's AsyncLLM: one token per step."""

    num_gpu_blocks = 512
    block_size = 16
    max_num_seqs = 64
    max_num_batched_tokens = 2048

    async def generate(self, prompt_ids, max_tokens, request_id):
        for token in [t for t in prompt_ids if t < 256][:max_tokens]:
            await asyncio.sleep(0.001)
            yield token


class DecodeWorkerHandler:
    def __init__(self, engine, served_model_name):
        self.engine = engine
        self.served_model_name = served_model_name

    async def generate(self, request, context):
        request_id = context.id()
        logger.debug("New request %s", request_id)
        max_tokens = request["stop_conditions"].get("max_tokens") or 16
        produced = 0
        async for token in self.engine.generate(request["token_ids"], max_tokens, request_id):
            if context.is_stopped():
                yield {"token_ids": [], "finish_reason": "cancelled"}
                return
            produced += 1
            yield {"token_ids": [token], "finish_reason": None}
        yield {
            "token_ids": [],
            "finish_reason": "length" if produced == max_tokens else "stop",
            "completion_usage": {"prompt_tokens": len(request["token_ids"]),
                                 "completion_tokens": produced,
                                 "total_tokens": len(request["token_ids"]) + produced},
        }


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--namespace", default=os.environ.get("DYN_NAMESPACE", "dynamo"))
    parser.add_argument("--component", default="backend")
    parser.add_argument("--endpoint", default="generate")
    return parser.parse_args()


async def init(runtime: DistributedRuntime, config):
    generate_endpoint = runtime.endpoint(
        f"{config.namespace}.{config.component}.{config.endpoint}"
    )
    engine = EchoEngine()
    handler = DecodeWorkerHandler(engine, config.served_model_name)
    logger.info("connection id %s", generate_endpoint.connection_id())

    runtime_config = ModelRuntimeConfig()
    runtime_config.total_kv_blocks = engine.num_gpu_blocks
    runtime_config.max_num_seqs = engine.max_num_seqs
    runtime_config.max_num_batched_tokens = engine.max_num_batched_tokens
    runtime_config.enable_local_indexer = False
    runtime_config.kv_event_publishing_enabled = False
    runtime_config.kv_state_endpoint = None
    runtime_config.tool_call_parser = None
    runtime_config.reasoning_parser = None
    runtime_config.exclude_tools_when_tool_choice_none = True
    runtime_config.set_structural_tag(None)
    runtime_config.set_engine_specific("stream_interval", "1")
    runtime_config.data_parallel_start_rank = 0
    runtime_config.data_parallel_size = 1

    await register_model(
        ModelInput.Tokens,
        ModelType.Chat | ModelType.Completions,
        generate_endpoint,
        config.model_path,
        config.served_model_name,
        kv_cache_block_size=engine.block_size,
        runtime_config=runtime_config,
        custom_template_path=None,
        media_decoder=None,
        media_fetcher=None,
        worker_type=WorkerType.Aggregated,
        needs=None,
        router_config=None,
        ignore_weights=False,
        model_aliases=None,
        max_gpu_lora_count=None,
    )
    print("worker ready", flush=True)
    await generate_endpoint.serve_endpoint(
        handler.generate,
        graceful_shutdown=True,
        metrics_labels=[("model", config.served_model_name)],
        health_check_payload={"token_ids": [1], "stop_conditions": {"max_tokens": 1}},
    )


@dynamo_worker()
async def worker(runtime: DistributedRuntime):
    await init(runtime, parse_args())


if __name__ == "__main__":
    asyncio.run(worker())
