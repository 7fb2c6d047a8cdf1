"""Drives a running llmo-serve with the official `openai` Python SDK.

Usage: python3 openai_sdk_client.py BASE_URL MODEL
Exits non-zero (with the failing check) when the server's answers do not match what the SDK
expects. Requires `pip install openai`.
"""
import sys

try:
    import openai
except ImportError:
    sys.exit("the `openai` Python package is missing: pip install openai")

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert models == [model], models

question = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=32)
text = chat.choices[0].message.content
assert "Paris" in text, text
assert chat.choices[0].finish_reason in ("stop", "length")
assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0

stream = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=32, stream=True,
    stream_options={"include_usage": True},
)
parts, usage, finish = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, ("".join(parts), text)
assert finish == chat.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens

comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
assert comp.choices[0].text.startswith(", the city of"), comp.choices[0].text
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    if c.choices
)
assert streamed == comp.choices[0].text, (streamed, comp.choices[0].text)

try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise AssertionError("unknown model was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "no-such-model" in str(e), e

print("openai SDK checks passed")
