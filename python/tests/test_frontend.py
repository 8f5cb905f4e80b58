"""Multi-process tests: a Python Tokens worker served by a real `dynamix frontend`, driven with the
official `openai` client (python-sdk spec §7.1, §10)."""

import os
import signal
import time

import pytest

from conftest import get_json, wait_for_model
import model_dir

openai = pytest.importorskip("openai")


@pytest.fixture
def tokens_model(tmp_path):
    return model_dir.write(str(tmp_path / "tiny"))


def client_for(frontend):
    return openai.OpenAI(base_url=f"{frontend.base}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def expected(content: str, max_tokens: int) -> str:
    """What the worker answers: the templated prompt without its special tokens, cut."""
    return f"user\n{content}\nassistant\n"[:max_tokens]


def start(cluster, tokens_model, *, compat=False, **env):
    worker = cluster.worker("worker", "tokens_worker.py", tokens_model, compat=compat, **env)
    worker.wait_for_output("worker ready")
    frontend = cluster.frontend()
    wait_for_model(frontend.base, "tiny")
    return worker, frontend


def test_a_tokens_worker_is_listed_streams_and_aggregates(cluster, tokens_model):
    worker, frontend = start(cluster, tokens_model)
    client = client_for(frontend)
    assert "tiny" in [m.id for m in client.models.list().data]

    chunks = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello, dynamix"}], max_tokens=8,
        stream=True)
    text, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == expected("Hello, dynamix", 8)
    assert finish == "length"

    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100)
    assert reply.choices[0].message.content == expected("hi", 100)
    assert reply.choices[0].finish_reason == "stop"
    # The templated prompt: three special tokens, and one token per byte of the rest.
    assert reply.usage.prompt_tokens == 3 + len("user\nhi\nassistant\n")
    assert reply.usage.completion_tokens == len(expected("hi", 100))

    completion = client.completions.create(model="tiny", prompt="abc", max_tokens=2)
    assert completion.choices[0].text == "ab"
    assert completion.choices[0].finish_reason == "length"


def test_handler_errors_become_http_errors_and_serving_goes_on(cluster, tokens_model):
    worker, frontend = start(cluster, tokens_model)
    client = client_for(frontend)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "please fail"}], max_tokens=8)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "please fail"}],
                max_tokens=8, stream=True):
            pass
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "still here"}], max_tokens=5)
    assert reply.choices[0].message.content == expected("still here", 5)


def test_a_client_disconnect_stops_the_handler(cluster, tokens_model, tmp_path):
    markers = tmp_path / "stops"
    markers.mkdir()
    worker, frontend = start(cluster, tokens_model, STOP_MARKER_DIR=str(markers))
    client = client_for(frontend)
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "go slow " * 20}], max_tokens=200,
        stream=True)
    received = 0
    for chunk in stream:
        received += 1
        if received == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline and not os.listdir(markers):
        time.sleep(0.1)
    assert os.listdir(markers), f"the handler never saw the stop:\n{worker.output()}"


def test_sigterm_takes_the_worker_out_of_discovery(cluster, tokens_model):
    worker, frontend = start(cluster, tokens_model)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0, worker.output()
    # The lease was revoked: the instance is gone at once, not after the lease's TTL.
    health = None
    deadline = time.time() + 10
    while time.time() < deadline:
        health = get_json(f"{frontend.base}/health")
        if not health.get("instances"):
            break
        time.sleep(0.2)
    assert not health.get("instances"), health
    wait_for_model(frontend.base, "tiny", present=False, timeout=10)


def test_the_compat_runner_serves_an_unmodified_dynamo_script(cluster, tokens_model, tmp_path):
    source = open(os.path.join(os.path.dirname(__file__), "workers", "tokens_worker.py")).read()
    script = tmp_path / "dynamo_worker.py"
    script.write_text(source.replace("from dynamix.", "from dynamo."))
    assert "dynamix" not in script.read_text().split('"""')[-1]
    worker = cluster.spawn("worker", [__import__("sys").executable, "-m", "dynamix.compat",
                                      str(script), tokens_model])
    worker.wait_for_output("worker ready")
    frontend = cluster.frontend()
    wait_for_model(frontend.base, "tiny")
    reply = client_for(frontend).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "compat"}], max_tokens=6)
    assert reply.choices[0].message.content == expected("compat", 6)


def test_a_request_moves_to_another_python_worker_when_its_worker_dies(cluster, tokens_model,
                                                                       tmp_path):
    markers = tmp_path / "serving"
    markers.mkdir()
    workers = [cluster.worker(f"worker{i}", "alphabet_worker.py", tokens_model,
                              SERVING_MARKER_DIR=str(markers)) for i in range(2)]
    for worker in workers:
        worker.wait_for_output("worker ready")
    frontend = cluster.frontend("--migration-limit", "3")
    wait_for_model(frontend.base, "tiny")
    client = client_for(frontend)
    # Both workers must be routable before the request, or the frontend has nowhere to move it.
    deadline = time.time() + 20
    while time.time() < deadline and len(get_json(f"{frontend.base}/health").get("instances", [])) < 2:
        time.sleep(0.1)
    prompt = client.completions.create(model="tiny", prompt="q", max_tokens=1)
    start = prompt.usage.prompt_tokens  # the next letter is ALPHABET[start % 26]
    for name in os.listdir(markers):  # from now on, the only marker is the streaming worker's
        os.remove(markers / name)
    stream = client.completions.create(model="tiny", prompt="q", max_tokens=40, stream=True)
    text = ""
    killed = None
    for chunk in stream:
        text += chunk.choices[0].text if chunk.choices else ""
        if killed is None and len(text) >= 5:
            for _ in range(50):
                serving = [int(name) for name in os.listdir(markers)]
                if serving:
                    break
                time.sleep(0.05)
            assert len(serving) == 1, serving
            victim = next(w for w in workers if w.proc.pid == serving[0])
            victim.proc.kill()
            killed = victim.name
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    assert killed is not None
    # Both workers served the stream: the one killed, then the one it moved to.
    assert sorted(os.listdir(markers)) == sorted(str(w.proc.pid) for w in workers)
    assert text == "".join(alphabet[(start + i) % 26] for i in range(40)), text


def test_unreachable_etcd_or_nats_is_a_connection_error_naming_the_address(cluster, tmp_path):
    import subprocess
    import sys
    from conftest import free_port

    script = ("import asyncio\n"
              "from dynamix.runtime import DistributedRuntime\n"
              "async def main():\n"
              "    try:\n"
              "        DistributedRuntime(asyncio.get_running_loop(), 'etcd')\n"
              "        print('connected')\n"
              "    except ConnectionError as e:\n"
              "        print('ConnectionError:', e)\n"
              "asyncio.run(main())\n")
    closed = free_port()
    cases = [
        (dict(ETCD_ENDPOINTS=f"http://127.0.0.1:{closed}"), f"127.0.0.1:{closed}"),
        (dict(NATS_SERVER=f"nats://127.0.0.1:{closed}"), f"nats://127.0.0.1:{closed}"),
        ({}, "connected"),
    ]
    for extra, expected in cases:
        env = dict(cluster.env, DYN_TCP_CONNECT_TIMEOUT="2", **extra)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=60, cwd=tmp_path)
        assert expected in done.stdout, (extra, done.stdout, done.stderr)
        assert ("ConnectionError" in done.stdout) == bool(extra), done.stdout


def test_a_worker_whose_lease_is_lost_registers_again(cluster, tokens_model):
    import json
    import urllib.request

    worker, frontend = start(cluster, tokens_model)
    client = client_for(frontend)
    instances = get_json(f"{frontend.base}/health")["instances"]
    assert len(instances) == 1
    old = instances[0]["instance_id"]
    # Revoke the worker's lease behind its back (etcd's HTTP gateway): its keys vanish at once.
    etcd = os.environ["ETCD_ENDPOINTS"].split(",")[0].rstrip("/")
    request = urllib.request.Request(f"{etcd}/v3/lease/revoke", method="POST",
                                     data=json.dumps({"ID": str(old)}).encode(),
                                     headers={"content-type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()
    # The worker notices at its next keep-alive, takes a new lease and registers everything again.
    deadline = time.time() + 20
    new = None
    while time.time() < deadline:
        instances = get_json(f"{frontend.base}/health").get("instances", [])
        ids = [i["instance_id"] for i in instances]
        if ids and old not in ids:
            new = ids[0]
            break
        time.sleep(0.2)
    assert new is not None and new != old, worker.output()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "back"}], max_tokens=6)
    assert reply.choices[0].message.content == expected("back", 6)
