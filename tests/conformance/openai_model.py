"""The official `openai` SDK against dynamix serving the real model (out=model).

Usage: openai_model.py BASE_URL MODEL. Every response is parsed by the SDK's pydantic models, so a
schema mistake (logprobs, usage, chunk shapes) fails here even when the text is right.
"""
import sys

from openai import OpenAI

failures = []


def check(name, condition, detail=""):
    print(("ok   " if condition else "FAIL ") + name, flush=True)
    if not condition:
        failures.append(f"{name}: {detail}")


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "What is the capital of France?"}]

    chat = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=24)
    answer = chat.choices[0].message.content
    check("greedy answer names Paris", "Paris" in answer, answer)
    check("finish_reason stop", chat.choices[0].finish_reason == "stop", chat.choices[0].finish_reason)
    check("usage adds up", chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
          and chat.usage.completion_tokens > 0, chat.usage)

    text, usage, finish = "", None, None
    for chunk in client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=24,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    check("stream equals unary", text == answer, (text, answer))
    check("stream usage equals unary", usage is not None and usage.completion_tokens == chat.usage.completion_tokens,
          usage)

    lp = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=6,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    check("logprobs per token", len(content) == lp.usage.completion_tokens
          or (lp.choices[0].finish_reason == "stop" and len(content) == lp.usage.completion_tokens - 1),
          (len(content), lp.usage))
    check("top_logprobs sorted, greedy token first",
          all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
              and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
              for t in content), content[:2])
    check("logprob text matches the answer", "".join(t.token for t in content) == lp.choices[0].message.content,
          lp.choices[0].message.content)

    seeded = lambda seed: client.chat.completions.create(  # noqa: E731
        model=model, messages=[{"role": "user", "content": "Tell me a short story."}], temperature=1.0,
        seed=seed, max_tokens=16).choices[0].message.content
    first = seeded(1234)
    check("same seed, same text", first == seeded(1234), first)

    two = client.chat.completions.create(model=model, messages=ask, n=2, temperature=0.8, seed=7, max_tokens=8)
    check("n=2 gives two choices", sorted(c.index for c in two.choices) == [0, 1], two.choices)

    length = client.chat.completions.create(model=model, messages=ask, temperature=0, max_completion_tokens=3)
    check("max_completion_tokens → length", length.choices[0].finish_reason == "length"
          and length.usage.completion_tokens == 3, length)

    stop = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=24, stop=["Paris"])
    check("stop string not emitted, finish stop", "Paris" not in stop.choices[0].message.content
          and stop.choices[0].finish_reason == "stop", stop.choices[0])

    completion = client.completions.create(model=model, prompt="The capital of France is", temperature=0,
                                           max_tokens=4, logprobs=2)
    c = completion.choices[0]
    check("completions logprobs", len(c.logprobs.tokens) == 4 and len(c.logprobs.top_logprobs) == 4
          and c.logprobs.text_offset[0] == 0 and "".join(c.logprobs.tokens) == c.text, c)

    if failures:
        print("\n".join(failures), flush=True)
        sys.exit(1)
    print("model conformance: all checks passed", flush=True)


if __name__ == "__main__":
    main()
