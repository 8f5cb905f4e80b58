"""A worker with a Text model, a Tokens model and a plain endpoint, behind a real `dynamix frontend`
(python-sdk spec §7.2, §10), driven with the official `openai` client and the SDK's own client."""

import asyncio
import os
import signal
import time

import pytest

from conftest import wait_for_model
import model_dir

openai = pytest.importorskip("openai")


@pytest.fixture
def deployment(cluster, tmp_path):
    tokens_model = model_dir.write(str(tmp_path / "tiny"))
    worker = cluster.worker("worker", "combined_worker.py", tokens_model)
    worker.wait_for_output("worker ready")
    frontend = cluster.frontend()
    wait_for_model(frontend.base, "tiny")
    wait_for_model(frontend.base, "reverse-bot")
    wait_for_model(frontend.base, "reverse-bot-loud")
    client = openai.OpenAI(base_url=f"{frontend.base}/v1", api_key="unused", max_retries=0,
                           timeout=30)
    return worker, frontend, client


def test_text_and_tokens_models_are_both_served(deployment):
    worker, frontend, client = deployment
    listed = {m.id for m in client.models.list().data}
    assert {"tiny", "reverse-bot"} <= listed

    stream = client.chat.completions.create(
        model="reverse-bot", messages=[{"role": "user", "content": "one two three"}], stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "three two one"
    assert chunks[-1].choices[0].finish_reason == "stop"

    reply = client.chat.completions.create(
        model="reverse-bot", messages=[{"role": "user", "content": "a b"}])
    assert reply.choices[0].message.content == "b a"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 2

    loud = client.chat.completions.create(
        model="reverse-bot-loud", messages=[{"role": "user", "content": "quiet please"}])
    assert loud.choices[0].message.content == "PLEASE QUIET"
    assert "reverse-bot-loud" in listed

    tokens = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "xyz"}], max_tokens=7)
    assert tokens.choices[0].message.content == "user\nxy"

    called = client.chat.completions.create(
        model="reverse-bot", messages=[{"role": "user", "content": "call a tool"}])
    calls = called.choices[0].message.tool_calls
    assert called.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == \
        [("call_1", "lookup", '{"x": 1}')]

    # A Text-model request in flight shows in /health, like any other.
    from conftest import get_json
    words = " ".join(f"w{i}" for i in range(100))
    stream = client.chat.completions.create(
        model="reverse-bot", messages=[{"role": "user", "content": words}], stream=True)
    seen = []
    for n, chunk in enumerate(stream):
        if n == 2:
            seen.append(get_json(f"{frontend.base}/health")["inflight_requests"])
    assert seen == [1], seen
    deadline = time.time() + 5  # the server drops the entry just after the last frame
    while get_json(f"{frontend.base}/health")["inflight_requests"] and time.time() < deadline:
        time.sleep(0.05)
    assert get_json(f"{frontend.base}/health")["inflight_requests"] == 0

    # Text-model requests are counted like any other.
    import urllib.request
    metrics = urllib.request.urlopen(f"{frontend.base}/metrics", timeout=5).read().decode()
    counted = [line for line in metrics.splitlines()
               if line.startswith("dynamo_frontend_requests_total{") and 'model="reverse-bot"' in line]
    assert counted, metrics[:2000]


def test_a_text_chat_model_answers_the_responses_api(deployment):
    worker, frontend, client = deployment
    response = client.responses.create(model="reverse-bot", input="one two three",
                                       instructions="be brief")
    assert response.output_text == "three two one"
    assert response.status == "completed" and response.model == "reverse-bot"
    events = list(client.responses.create(model="reverse-bot", input="a b c", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "c b a"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "c b a"
    # The worker's error keeps its status here too.
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="reverse-bot", input="missing")
    assert "no such conversation" in str(missing.value)


def test_text_model_errors_keep_their_status_and_the_worker_goes_on(deployment):
    worker, frontend, client = deployment
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="reverse-bot",
                                       messages=[{"role": "system", "content": "only"}])
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="reverse-bot",
                                       messages=[{"role": "user", "content": "missing"}])
    assert "no such conversation" in str(missing.value)
    # A status no error class has: the handler's HttpError code, with its message.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.chat.completions.create(model="reverse-bot",
                                       messages=[{"role": "user", "content": "forbidden"}])
    assert denied.value.status_code == 403 and "not allowed" in str(denied.value)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="reverse-bot",
                                       messages=[{"role": "user", "content": "explode now"}])
    got = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
                model="reverse-bot", messages=[{"role": "user", "content": "explode now"}],
                stream=True):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert got == ["now "]
    # A Chat-only Text model has no completions route.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="reverse-bot", prompt="x")
    reply = client.chat.completions.create(
        model="reverse-bot", messages=[{"role": "user", "content": "still fine"}])
    assert reply.choices[0].message.content == "fine still"


async def test_an_sdk_client_calls_the_plain_endpoint(deployment, cluster):
    from dynamix.runtime import DistributedRuntime

    os.environ.update(ETCD_ENDPOINTS=cluster.env["ETCD_ENDPOINTS"])
    runtime = DistributedRuntime(asyncio.get_running_loop(), "etcd")
    endpoint = runtime.endpoint(f"{cluster.ns}.greeter.generate")
    client = await endpoint.client()
    ids = await asyncio.wait_for(client.wait_for_instances(), 10)
    assert len(ids) == 1
    items = [i.data() async for i in await client.round_robin("ada, grace")]
    assert items == ["hello, ada", "hello, grace"]
    direct = [i async for i in await client.direct("linus", ids[0], annotated=False)]
    assert direct == ["hello, linus"]
    await runtime._close()


def test_a_stopped_workers_text_model_leaves_the_model_list(deployment):
    worker, frontend, client = deployment
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0, worker.output()
    wait_for_model(frontend.base, "reverse-bot", present=False, timeout=10)
    wait_for_model(frontend.base, "reverse-bot-loud", present=False, timeout=10)
    # The Tokens model goes too, once no worker serves it.
    wait_for_model(frontend.base, "tiny", present=False, timeout=10)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="reverse-bot",
                                       messages=[{"role": "user", "content": "hi"}])


def test_a_frontend_serves_text_models_alone(cluster):
    worker = cluster.worker("worker", "reverse_bot.py")
    worker.wait_for_output("worker ready")
    frontend = cluster.frontend()
    # No Tokens card anywhere: after a short wait the frontend serves the Text model alone, and
    # lists nothing else.
    assert wait_for_model(frontend.base, "reverse-bot") == ["reverse-bot"]
    client = openai.OpenAI(base_url=f"{frontend.base}/v1", api_key="unused", max_retries=0,
                           timeout=30)
    reply = client.chat.completions.create(
        model="reverse-bot", messages=[{"role": "user", "content": "hello text world"}])
    assert reply.choices[0].message.content == "world text hello"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
