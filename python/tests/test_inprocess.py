"""In-process tests: discovery backend ``mem``, no servers (python-sdk spec §9.6)."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dynamix.llm import (ModelInput, ModelRuntimeConfig, ModelType, WorkerType, lora_name_to_id,
                         register_model, unregister_model)
from dynamix.llm.exceptions import DynamoException, HttpError
from dynamix.runtime import Annotated, Context, DistributedRuntime, dynamo_endpoint

_counter = 0


def fresh_endpoint(runtime, name="generate"):
    """A new component per test: the mem store is shared by the whole process."""
    global _counter
    _counter += 1
    return runtime.endpoint(f"test.comp{_counter}.{name}")


async def serve(endpoint, handler):
    task = asyncio.create_task(endpoint.serve_endpoint(handler))
    client = await endpoint.client()
    await asyncio.wait_for(client.wait_for_instances(), 5)
    return task, client


async def stop(runtime, task):
    os.environ["DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"] = "0"
    runtime.shutdown()
    await asyncio.wait_for(task, 10)


@pytest.fixture
async def runtime():
    rt = DistributedRuntime(asyncio.get_running_loop(), "mem")
    yield rt
    rt.shutdown()


async def greet(names):
    for name in names.split(","):
        yield f"hello, {name.strip()}"


async def test_serve_and_call_round_trip(runtime):
    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, greet)
    assert client.instance_ids() == [endpoint.connection_id()]
    items = [item async for item in await client.round_robin("ada, grace")]
    assert all(isinstance(i, Annotated) for i in items)
    assert [i.data() for i in items] == ["hello, ada", "hello, grace"]
    assert items[0].event() is None and items[0].comments() == [] and not items[0].is_error()
    bare = [item async for item in await client.random("linus", annotated=False)]
    assert bare == ["hello, linus"]
    direct = await client.direct("x", endpoint.connection_id(), annotated=False)
    assert [i async for i in direct] == ["hello, x"]
    assert [i async for i in await client.generate("y", annotated=False)] == ["hello, y"]
    await stop(runtime, task)


async def test_handlers_with_and_without_context_and_json_values(runtime):
    seen = {}

    class Engine:
        async def generate(self, request, context):
            seen["id"] = context.id()
            seen["metadata"] = context.metadata
            yield {"echo": request, "n": [1, 2.5, None, True]}

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, Engine().generate)
    context = Context("req-42", {"tenant": "a"})
    items = [i.data() async for i in await client.round_robin({"q": [1, "two"]}, context=context)]
    assert items == [{"echo": {"q": [1, "two"]}, "n": [1, 2.5, None, True]}]
    assert seen == {"id": "req-42", "metadata": {"tenant": "a"}}
    await stop(runtime, task)


async def test_an_error_before_the_first_item_raises_with_class_and_text(runtime):
    async def broken(request):
        raise RuntimeError("boom")
        yield  # pragma: no cover

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, broken)
    with pytest.raises(ValueError) as caught:
        async for _ in await client.round_robin("x"):
            pass
    assert str(caught.value) == "Internal: RuntimeError: boom"
    assert isinstance(caught.value, DynamoException)
    assert caught.value.error_class == "Internal"
    await stop(runtime, task)


async def test_an_error_after_items_comes_after_them_and_the_endpoint_keeps_serving(runtime):
    async def half(request):
        yield "one"
        if request == "bad":
            raise ValueError("not this one")
        yield "two"

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, half)
    got = []
    with pytest.raises(ValueError) as caught:
        async for item in await client.round_robin("bad", annotated=False):
            got.append(item)
    assert got == ["one"]
    assert str(caught.value) == "InvalidRequest: ValueError: not this one"
    assert [i async for i in await client.round_robin("good", annotated=False)] == ["one", "two"]
    await stop(runtime, task)


async def test_http_error_keeps_its_message(runtime):
    async def refuse(request):
        raise HttpError(404, "no such adapter")
        yield  # pragma: no cover

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, refuse)
    with pytest.raises(ValueError, match="NotFound: no such adapter"):
        async for _ in await client.round_robin("x"):
            pass
    await stop(runtime, task)


async def test_a_value_that_is_not_json_is_an_error_naming_its_type(runtime):
    class Opaque:
        pass

    async def odd(request):
        yield "fine"
        yield {"value": Opaque()}

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, odd)
    got = []
    with pytest.raises(ValueError) as caught:
        async for item in await client.round_robin("x", annotated=False):
            got.append(item)
    assert got == ["fine"]
    text = str(caught.value)
    assert text.startswith("Internal: _InvalidResponse:"), text
    assert "Opaque" in text and "not JSON" in text
    await stop(runtime, task)


async def test_a_request_that_is_not_json_raises_type_error_before_sending(runtime):
    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, greet)
    with pytest.raises(TypeError, match="not JSON"):
        await client.round_robin(object())
    await stop(runtime, task)


async def test_stopping_from_the_client_context_reaches_the_handler(runtime):
    state = {"finally": False, "stopped_seen": False}

    async def counter(request, context):
        try:
            for i in range(1000):
                if context.is_stopped():
                    state["stopped_seen"] = True
                    return
                yield i
                await asyncio.sleep(0.01)
        finally:
            state["finally"] = True

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, counter)
    context = Context()
    got = []
    async for item in await client.round_robin("x", annotated=False, context=context):
        got.append(item)
        if len(got) == 3:
            context.stop_generating()
    assert 3 <= len(got) <= 4
    for _ in range(100):
        if state["finally"]:
            break
        await asyncio.sleep(0.02)
    assert state["finally"] and state["stopped_seen"]
    await stop(runtime, task)


async def test_leaving_the_iteration_closes_the_handler(runtime):
    state = {"closed": False}
    waiter = {}

    async def endless(request, context):
        waiter["event"] = context.async_killed_or_stopped()
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        finally:
            state["closed"] = True

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, endless)
    stream = await client.round_robin("x", annotated=False)
    async for item in stream:
        if item == 2:
            break
    await stream.aclose()
    assert await asyncio.wait_for(waiter["event"], 5) is True
    for _ in range(100):
        if state["closed"]:
            break
        await asyncio.sleep(0.02)
    assert state["closed"]
    await stop(runtime, task)


async def test_bad_handlers_and_names_are_refused(runtime):
    async def coroutine(request):
        return 1

    def plain(request):
        return 1

    endpoint = fresh_endpoint(runtime)
    for handler in (coroutine, plain):
        with pytest.raises(TypeError, match="async generator"):
            await endpoint.serve_endpoint(handler)
    with pytest.raises(ValueError, match="component"):
        runtime.endpoint("ns.Bad Name.ep")
    with pytest.raises(ValueError, match="three parts"):
        runtime.endpoint("ns.ep")
    assert str(runtime.endpoint("dyn://a.b.c")) == "dyn://a.b.c"
    with pytest.raises(ValueError, match="kubernetes"):
        DistributedRuntime(asyncio.get_running_loop(), "kubernetes")
    with pytest.raises(ValueError, match="nats"):
        DistributedRuntime(asyncio.get_running_loop(), "mem", "nats")
    with pytest.raises(ValueError, match="mem"):
        DistributedRuntime(asyncio.get_running_loop(), True)


async def test_unknown_instances_and_empty_endpoints_are_unavailable(runtime):
    endpoint = fresh_endpoint(runtime)
    client = await endpoint.client()
    with pytest.raises(ValueError, match="Unavailable: no instances for endpoint"):
        await client.round_robin("x")
    task, client = await serve(endpoint, greet)
    with pytest.raises(ValueError, match="Unavailable: instance_id=12345 not found"):
        await client.direct("x", 12345)
    await stop(runtime, task)


async def test_serving_the_same_endpoint_twice_is_refused(runtime):
    endpoint = fresh_endpoint(runtime)
    task, _ = await serve(endpoint, greet)
    with pytest.raises(RuntimeError, match="already served"):
        await endpoint.serve_endpoint(greet)
    await stop(runtime, task)


async def test_register_model_validates_its_input(runtime, tmp_path):
    endpoint = fresh_endpoint(runtime)
    common = dict(worker_type=WorkerType.Aggregated)
    with pytest.raises(ValueError, match="both be provided together"):
        await register_model(ModelInput.Text, ModelType.Chat, endpoint, "m", lora_name="x",
                             **common)
    with pytest.raises(FileNotFoundError, match="local directory"):
        await register_model(ModelInput.Tokens, ModelType.Chat, endpoint,
                             str(tmp_path / "missing"), **common)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        await register_model(ModelInput.Tokens, ModelType.Chat, endpoint, str(tmp_path), **common)
    with pytest.raises(ValueError, match="skip_model_assets"):
        await register_model(ModelInput.Tokens, ModelType.Chat, endpoint, str(tmp_path),
                             skip_model_assets=True, **common)
    with pytest.raises(NotImplementedError, match="Tensor"):
        await register_model(ModelInput.Tensor, ModelType.Chat, endpoint, "m", **common)
    with pytest.raises(NotImplementedError, match="Images"):
        await register_model(ModelInput.Text, ModelType.Images, endpoint, "m", **common)
    with pytest.raises(NotImplementedError, match="Prefill"):
        await register_model(ModelInput.Text, ModelType.Chat, endpoint, "m",
                             worker_type=WorkerType.Prefill)
    with pytest.raises(ValueError, match="64 KiB"):
        await register_model(ModelInput.Text, ModelType.Chat, endpoint, "m",
                             user_data={"x": "y" * 70000}, **common)
    with pytest.raises(TypeError, match="bogus"):
        await register_model(ModelInput.Text, ModelType.Chat, endpoint, "m", bogus=1, **common)
    # Accepted: a Text model by name, with Dynamo-only keywords ignored.
    await register_model(ModelInput.Text, ModelType.Chat | ModelType.Completions, endpoint,
                         "reverse-bot", skip_model_assets=True, media_decoder=None, **common)
    await unregister_model(endpoint)


def test_model_types_combine_and_lora_ids_are_stable():
    both = ModelType.Chat | ModelType.Completions
    assert both.supports_chat() and both.supports_completions() and not both.supports_embedding()
    assert both.as_str() == "Chat | Completions"
    assert lora_name_to_id("a") == lora_name_to_id("a") != lora_name_to_id("b")
    assert 0 < lora_name_to_id("tiny-tail") < 2**63
    config = ModelRuntimeConfig()
    config.set_engine_specific("k", [1])
    assert config.get_engine_specific("k") == [1]
    # Dynamo 1.6.1's attributes and defaults, so vLLM-style registration code runs unchanged.
    assert (config.exclude_tools_when_tool_choice_none, config.enable_local_indexer,
            config.data_parallel_size, config.taints, config.structural_tag) == \
        (True, True, 1, set(), None)
    config.kv_event_publishing_enabled = False
    config.set_structural_tag({"scope": "tools"})
    config.set_disaggregated_endpoint("host", 7)
    card = config._card()
    assert card["structural_tag"] == {"scope": "tools"} and card["bootstrap_port"] == 7
    assert card["runtime_data"] == {"k": [1]} and card["kv_event_publishing_enabled"] is False
    with pytest.raises(AttributeError, match="no attribute 'max_num_seq'"):
        config.max_num_seq = 4
    with pytest.raises(TypeError, match="max_num_seqs"):
        config.max_num_seqs = "4"


async def test_dynamo_endpoint_parses_pydantic_models_and_passes_strings(runtime):
    pydantic = pytest.importorskip("pydantic")

    class Request(pydantic.BaseModel):
        text: str

    class Engine:
        @dynamo_endpoint(Request, None)
        async def generate(self, request):
            yield request.text.upper()

    endpoint = fresh_endpoint(runtime)
    task, client = await serve(endpoint, Engine().generate)
    assert [i async for i in await client.round_robin({"text": "hi"}, annotated=False)] == ["HI"]
    with pytest.raises(ValueError, match="InvalidRequest"):
        async for _ in await client.round_robin({"nope": 1}):
            pass
    await stop(runtime, task)


def test_compat_runs_an_unmodified_dynamo_script(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import asyncio, sys
        from dynamo.runtime import DistributedRuntime, dynamo_worker
        from dynamo.llm import ModelInput, ModelType
        from dynamo.llm.exceptions import HttpError
        import dynamo.runtime.logging

        async def greet(names):
            for name in names.split(","):
                yield f"hello, {name}"

        @dynamo_worker()
        async def main(runtime: DistributedRuntime):
            endpoint = runtime.endpoint("demo.greeter.generate")
            server = asyncio.create_task(endpoint.serve_endpoint(greet))
            client = await endpoint.client()
            await asyncio.wait_for(client.wait_for_instances(), 10)
            async for item in await client.round_robin(sys.argv[1]):
                print(item.data())
            runtime.shutdown()
            await server

        asyncio.run(main())
    """))
    env = dict(os.environ, DYN_DISCOVERY_BACKEND="mem", DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS="0")
    # cwd: `python -m` puts it first on sys.path, and the source tree's `dynamix` (python/) must not
    # shadow the installed one.
    done = subprocess.run([sys.executable, "-m", "dynamix.compat", str(script), "ada,grace"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["hello, ada", "hello, grace"]

    other = tmp_path / "vllm_worker.py"
    other.write_text("import dynamo.vllm\n")
    done = subprocess.run([sys.executable, "-m", "dynamix.compat", str(other)],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "dynamo.vllm" in done.stderr and "only dynamo.runtime and dynamo.llm" in done.stderr


def test_features_dynamix_lacks_are_importable_and_say_so():
    from dynamix.llm import KvEventPublisher, WorkerMetricsPublisher

    with pytest.raises(NotImplementedError, match="KV events"):
        KvEventPublisher(None)
    with pytest.raises(NotImplementedError, match="load metrics"):
        WorkerMetricsPublisher()
