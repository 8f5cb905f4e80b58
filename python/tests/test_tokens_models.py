"""Several Tokens models behind one `dynamix frontend` (python-sdk spec §7, §6.3): the frontend
serves every model it finds a card for, on any endpoint, each with its own tokenizer; a LoRA
adapter is listed as a model, routed only to the workers that carry it, and named in
`routing.lora_name`; a model leaves `/v1/models` when its card or its worker goes."""

import signal

import pytest

from conftest import get_json, wait_for_model
import model_dir

openai = pytest.importorskip("openai")


def client_for(frontend):
    return openai.OpenAI(base_url=f"{frontend.base}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def ask(client, model, content, max_tokens=64):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens)
    return reply.choices[0].message.content


def test_models_on_other_endpoints_and_adapters_are_served(cluster, tmp_path):
    own = model_dir.write(str(tmp_path / "own"))
    other = model_dir.write(str(tmp_path / "other"))
    # The frontend's own endpoint serves "first"; "tiny" and its adapter "tiny-tail" live on
    # another endpoint, as in the spec's §8.3 example.
    first = cluster.worker("first", "tokens_worker.py", own, MODEL_NAME="first",
                           MODEL_ALIASES="first-alias")
    first.wait_for_output("worker ready")
    frontend = cluster.frontend()
    wait_for_model(frontend.base, "first")
    second = cluster.worker("second", "tokens_worker.py", other, MODEL_NAME="tiny",
                            LORA_NAME="tiny-tail", ENDPOINT=f"{cluster.ns}.tokens.generate",
                            MODEL_ALIASES="tiny-latest,tiny-stable")
    second.wait_for_output("worker ready")
    wait_for_model(frontend.base, "tiny")
    listed = wait_for_model(frontend.base, "tiny-tail")
    assert {"first", "tiny", "tiny-tail"} <= set(listed), listed
    client = client_for(frontend)

    # A card's model_aliases are listed and served like its name, for a frontend's own model too.
    listed = wait_for_model(frontend.base, "tiny-stable")
    assert {"first-alias", "tiny-latest", "tiny-stable"} <= set(listed), listed
    for alias in ("first-alias", "tiny-latest"):
        reply = client.chat.completions.create(
            model=alias, messages=[{"role": "user", "content": "abc"}], max_tokens=8)
        assert reply.choices[0].message.content == "user\nabc" and reply.model == alias

    # Each model answers through its own worker; the adapter's requests carry its name (the
    # worker checks routing.lora_name against the model and answers the prompt's tail).
    assert ask(client, "first", "abc", max_tokens=8) == "user\nabc"
    assert ask(client, "tiny", "abc", max_tokens=8) == "user\nabc"
    assert ask(client, "tiny-tail", "abc", max_tokens=8) == "\nassistant\n"[-8:]
    stream = client.chat.completions.create(
        model="tiny-tail", messages=[{"role": "user", "content": "xyz"}], max_tokens=5,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "sistant\n"[-5:]
    assert chunks[-1].usage.completion_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    # "tiny" takes completions; its adapter registered Chat only, so that route does not know it.
    completion = client.completions.create(model="tiny", prompt="hello", max_tokens=3)
    assert completion.choices[0].text == "hel"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-tail", prompt="hello", max_tokens=3)

    # The lanes' requests are counted in the frontend's metrics, under their own model names.
    import urllib.request
    metrics = urllib.request.urlopen(f"{frontend.base}/metrics", timeout=5).read().decode()
    for model in ("tiny", "tiny-tail"):
        assert any(line.startswith("dynamo_frontend_requests_total{") and f'model="{model}"' in line
                   for line in metrics.splitlines()), (model, metrics[:3000])

    # The worker unregisters its adapter: the adapter leaves the list, its base model stays.
    assert ask(client, "tiny-tail", "drop the adapter", max_tokens=2)
    wait_for_model(frontend.base, "tiny-tail", present=False, timeout=15)
    with pytest.raises(openai.NotFoundError):
        ask(client, "tiny-tail", "abc")
    assert ask(client, "tiny", "abc", max_tokens=8) == "user\nabc"

    # Its worker stops: "tiny" leaves too, and the frontend's own model goes on serving.
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(20) == 0, second.output()
    wait_for_model(frontend.base, "tiny", present=False, timeout=15)
    assert "tiny-latest" not in wait_for_model(frontend.base, "tiny-stable", present=False)
    assert ask(client, "first", "abc", max_tokens=8) == "user\nabc"


def test_a_frontend_without_its_own_model_serves_tokens_models_that_come_later(cluster, tmp_path):
    text = cluster.worker("text", "reverse_bot.py")
    text.wait_for_output("worker ready")
    frontend = cluster.frontend()
    assert wait_for_model(frontend.base, "reverse-bot") == ["reverse-bot"]
    # /health counts the Text model's worker as an instance like any other.
    health = get_json(f"{frontend.base}/health")
    assert health["status"] == "healthy" and len(health["instances"]) == 1, health
    # A Tokens worker registers after the frontend started with the Text model alone, on the
    # frontend's own endpoint: it is served all the same.
    tokens = cluster.worker("tokens", "tokens_worker.py", model_dir.write(str(tmp_path / "m")))
    tokens.wait_for_output("worker ready")
    wait_for_model(frontend.base, "tiny", timeout=20)
    client = client_for(frontend)
    assert ask(client, "tiny", "later", max_tokens=10) == "user\nlater"
    assert ask(client, "reverse-bot", "one two") == "two one"
    health = get_json(f"{frontend.base}/health")
    assert len(health["instances"]) == 2, health
    assert f"dyn://{cluster.ns}.backend.generate" in health["endpoints"], health


def test_a_vllm_style_dynamo_worker_runs_unchanged_under_compat(cluster, tmp_path):
    model = model_dir.write(str(tmp_path / "m"))
    worker = cluster.worker("vllm", "vllm_style_worker.py", "--model-path", model,
                            "--served-model-name", "vllm-tiny", "--namespace", cluster.ns,
                            compat=True)
    worker.wait_for_output("worker ready")
    frontend = cluster.frontend()
    wait_for_model(frontend.base, "vllm-tiny")
    client = client_for(frontend)
    assert ask(client, "vllm-tiny", "abcdef", max_tokens=9) == "user\nabcd"
    stream = client.chat.completions.create(
        model="vllm-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "user\nhi\nassistant\n"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == len(text)
    completion = client.completions.create(model="vllm-tiny", prompt="hello", max_tokens=2)
    assert completion.choices[0].text == "he" and completion.choices[0].finish_reason == "length"
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(20) == 0, worker.output()
    wait_for_model(frontend.base, "vllm-tiny", present=False, timeout=15)
