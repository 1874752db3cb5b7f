"""The official `openai` and `ollama` Python clients, unmodified, get through the
gateway exactly what they get directly from the LLM server, but for the rewritten model;
and the gateway's access log records the usage the server reported."""

import json
import time

import ollama
import openai
import pytest

from conftest import REWRITTEN

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colours."},
]

# Fields that differ between any two calls (ids, clocks, timings).
VOLATILE = {"id", "created", "created_at", "total_duration", "load_duration",
            "prompt_eval_duration", "eval_duration"}


def scrub(value):
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def dump(obj):
    return scrub(obj.model_dump())


def access_records(log_path, path):
    """Every access-log record written so far for `path`."""
    records = []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("target") == "access" and rec.get("path") == path:
            records.append(rec)
    return records


class NewRecord:
    """The access record a call writes: `with NewRecord(log, path) as r: call()`, then
    `r.record`. It waits for a record that was not there before the call."""

    def __init__(self, log_path, path):
        self.log_path, self.path = log_path, path

    def __enter__(self):
        self.before = len(access_records(self.log_path, self.path))
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            records = access_records(self.log_path, self.path)
            if len(records) > self.before:
                assert len(records) == self.before + 1, "one call, one record"
                self.record = records[-1]
                return False
            time.sleep(0.02)
        raise AssertionError(f"no new access record for {self.path}")


@pytest.fixture()
def oa(servers):
    direct, via, _ = servers
    return (openai.OpenAI(base_url=f"{direct}/v1", api_key="sk-test", max_retries=0),
            openai.OpenAI(base_url=f"{via}/v1", api_key="sk-test", max_retries=0))


@pytest.fixture()
def ol(servers):
    direct, via, _ = servers
    return ollama.Client(host=direct), ollama.Client(host=via)


def test_openai_chat(oa, servers):
    direct, via = oa
    want = direct.chat.completions.create(model=REWRITTEN, messages=MESSAGES, max_tokens=12)
    with NewRecord(servers[2], "/v1/chat/completions") as new:
        got = via.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=12)
    assert got.model == REWRITTEN
    assert dump(got) == dump(want)
    rec = new.record
    assert rec["requested_model"] == "gpt-4o-mini" and rec["used_model"] == REWRITTEN
    assert rec["input_tokens"] == got.usage.prompt_tokens
    assert rec["output_tokens"] == got.usage.completion_tokens
    assert rec["input_source"] == "provider"


def test_openai_chat_stream(oa, servers):
    direct, via = oa
    want = [dump(c) for c in direct.chat.completions.create(
        model=REWRITTEN, messages=MESSAGES, max_tokens=12, stream=True)]
    with NewRecord(servers[2], "/v1/chat/completions") as new:
        got_chunks = list(via.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=12, stream=True))
    assert [dump(c) for c in got_chunks] == want
    assert all(c.usage is None for c in got_chunks), "the injected usage chunk stays hidden"
    text = "".join(c.choices[0].delta.content or "" for c in got_chunks if c.choices)
    rec = new.record
    assert rec["streamed"] is True
    assert rec["output_source"] == "provider", "exact usage although the client asked none"
    assert rec["output_tokens"] == 12 and text


def test_openai_embeddings(oa, servers):
    direct, via = oa
    want = direct.embeddings.create(model=REWRITTEN, input=["alpha beta", "gamma"])
    with NewRecord(servers[2], "/v1/embeddings") as new:
        got = via.embeddings.create(model="text-embedding-3-small", input=["alpha beta", "gamma"])
    assert dump(got) == dump(want)
    assert len(got.data) == 2 and len(got.data[0].embedding) == 8
    rec = new.record
    assert rec["input_tokens"] == got.usage.prompt_tokens and rec["output_tokens"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat(ol, servers, stream):
    direct, via = ol
    opts = {"num_predict": 10}
    with NewRecord(servers[2], "/api/chat") as new:
        if stream:
            got = [dump(p) for p in via.chat(model="llama3.2:1b", messages=MESSAGES, options=opts, stream=True)]
            final = got[-1]
        else:
            got = dump(via.chat(model="llama3.2:1b", messages=MESSAGES, options=opts))
            final = got
    if stream:
        want = [dump(p) for p in direct.chat(model=REWRITTEN, messages=MESSAGES, options=opts, stream=True)]
    else:
        want = dump(direct.chat(model=REWRITTEN, messages=MESSAGES, options=opts))
    assert got == want
    assert final["model"] == REWRITTEN and final["done"] is True
    rec = new.record
    assert rec["streamed"] is stream
    assert rec["input_tokens"] == final["prompt_eval_count"]
    assert rec["output_tokens"] == final["eval_count"]


@pytest.mark.parametrize("stream", [False, True])
def test_ollama_generate(ol, servers, stream):
    direct, via = ol
    with NewRecord(servers[2], "/api/generate") as new:
        if stream:
            got = [dump(p) for p in via.generate(model="llama3.2:1b", prompt="Why is the sky blue?", stream=True)]
            final = got[-1]
        else:
            got = dump(via.generate(model="llama3.2:1b", prompt="Why is the sky blue?"))
            final = got
    if stream:
        want = [dump(p) for p in direct.generate(model=REWRITTEN, prompt="Why is the sky blue?", stream=True)]
    else:
        want = dump(direct.generate(model=REWRITTEN, prompt="Why is the sky blue?"))
    assert got == want
    rec = new.record
    assert rec["output_tokens"] == final["eval_count"] and rec["streamed"] is stream


def test_ollama_embed(ol, servers):
    direct, via = ol
    want = dump(direct.embed(model=REWRITTEN, input=["alpha beta", "gamma"]))
    with NewRecord(servers[2], "/api/embed") as new:
        got = dump(via.embed(model="nomic-embed-text", input=["alpha beta", "gamma"]))
    assert got == want
    assert got["model"] == REWRITTEN and len(got["embeddings"]) == 2
    rec = new.record
    assert rec["input_tokens"] == got["prompt_eval_count"]


def test_errors_reach_the_clients_in_their_own_format(servers):
    # A gateway pointed at a port where nothing listens.
    import subprocess
    from conftest import binary, free_port, wait_listening
    dead, port = free_port(), free_port()
    gw = subprocess.Popen([binary("kube-gateway"), "run", "--listen", f"127.0.0.1:{port}",
                           "--upstream", f"127.0.0.1:{dead}", "--store", "none"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, gw, "gateway")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="m", messages=MESSAGES)
        assert err.value.status_code == 502
        assert err.value.body["code"] == "upstream_unreachable"
        with pytest.raises(ollama.ResponseError) as oerr:
            ollama.Client(host=f"http://127.0.0.1:{port}").chat(model="m", messages=MESSAGES)
        assert oerr.value.status_code == 502
        assert "could not be reached" in oerr.value.error
    finally:
        gw.terminate()
        gw.wait(timeout=15)
