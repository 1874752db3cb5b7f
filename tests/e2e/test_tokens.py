"""Token counts where the provider reports none, through the real binaries: the demo
server in its llama.cpp-like mode (`--own-tokenizer`: about twice tiktoken's counts, a
chat template on prompts, streams that never carry usage, one token per content event)
behind the gateway. Whole answers report usage: the gateway records it exactly, marked
`provider`, and calibrates with it; the streamed answers after them are recorded with
their content events (the demo's own count, exactly) and a calibrated prompt (within
10 % on average, 15 % each), where tiktoken alone is off by half."""

import openai
import pytest

from conftest import binary, free_port, start
from test_clients import NewRecord

PATH = "/v1/chat/completions"
MIN_SAMPLES = 5  # gateway/src/estimate.rs: samples before a fit (or events) is trusted

LONG = ("Services give a stable address to a changing set of pods, and an ingress routes "
        "outside traffic to them. ")


def user(text):
    return [{"role": "user", "content": text}]


def chat(*turns):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
            for i, t in enumerate(turns)]


# Prompts of varied lengths and message counts, so the fit sees both.
TRAINING = [
    (user("What is a pod?"), 30),
    (chat("Hi.", "Hello!", "What is YAML?"), 40),
    (user(LONG + "Summarise."), 60),
    (user("List four HTTP methods and what each one does."), 80),
    (chat("Ping.", "Pong.", "Again.", "Pong.", "Once more."), 20),
    (user(LONG * 3 + "Give it a title."), 50),
    ([{"role": "system", "content": "Be terse."}] + user("Name a CNI plugin."), 25),
]
MEASURED = [
    (user("Explain how DNS works inside a cluster."), 70),
    (chat("What is TLS?", "Transport Layer Security.", "Why use it?"), 45),
    (user(LONG * 2 + "What is missing?"), 90),
    (user("Count to ten in words."), 15),
    (chat("One.", "Two.", "Three?"), 35),
    (user("Write a limerick about load balancers."), 100),
    (user(LONG + "Rewrite it for a child, with an example."), 60),
    (chat("Define latency.", "Delay.", "And throughput?", "Rate.", "And jitter?"), 55),
]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """(direct client of the demo, client through the gateway, gateway log path)."""
    logs = tmp_path_factory.mktemp("own-tokenizer")
    demo_port, gw_port = free_port(), free_port()
    demo = start([binary("ai-demo"), "serve", "--own-tokenizer",
                  "--listen", f"127.0.0.1:{demo_port}"],
                 demo_port, "demo server", logs / "demo.log")
    gw_log = logs / "gateway.log"
    gw = start([binary("kube-gateway"), "--log-format", "json", "run",
                "--listen", f"127.0.0.1:{gw_port}", "--upstream", f"127.0.0.1:{demo_port}"],
               gw_port, "gateway", gw_log)
    client = lambda port: openai.OpenAI(  # noqa: E731
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0)
    yield client(demo_port), client(gw_port), gw_log
    for p in (gw, demo):
        p.terminate()
        p.wait(timeout=15)


def test_whole_answers_teach_and_streams_are_counted_by_their_events(own):
    direct, via, log = own
    for messages, max_tokens in TRAINING:
        with NewRecord(log, PATH) as new:
            got = via.chat.completions.create(model="llama", messages=messages,
                                              max_tokens=max_tokens)
        rec = new.record
        assert (rec["input_tokens"], rec["output_tokens"]) == (
            got.usage.prompt_tokens, got.usage.completion_tokens)
        assert (rec["input_source"], rec["output_source"]) == ("provider", "provider")

    errors = []
    for i, (messages, max_tokens) in enumerate(MEASURED):
        truth = direct.chat.completions.create(model="llama", messages=messages,
                                               max_tokens=max_tokens).usage
        with NewRecord(log, PATH) as new:
            stream = via.chat.completions.create(model="llama", messages=messages,
                                                 max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True})
            events, usage = 0, None
            for chunk in stream:
                usage = chunk.usage or usage
                events += sum(1 for c in chunk.choices if c.delta and c.delta.content)
        rec = new.record
        what = f"answer {i}: {rec}"
        assert usage is None, "the demo's streams carry no usage in this mode"
        assert events == truth.completion_tokens, what
        # The prompt: calibrated (tiktoken alone sees neither the demo's vocabulary nor
        # its template: off by about half).
        assert rec["input_source"] == "calibrated", what
        errors.append(abs(rec["input_tokens"] - truth.prompt_tokens) / truth.prompt_tokens)
        assert errors[-1] <= 0.15, f"prompt {rec['input_tokens']} vs {truth.prompt_tokens}: {what}"
        # The answer: the events are trusted once MIN_SAMPLES streams added up to the
        # calibrated count (this one included); before, the calibrated count itself.
        if i >= MIN_SAMPLES - 1:
            assert (rec["output_tokens"], rec["output_source"]) == (
                truth.completion_tokens, "content_events"), what
        else:
            assert rec["output_source"] == "calibrated", what

    # Within 10 % on average. One answer may miss by more: the last one has the same
    # tiktoken count and message count as a training prompt (13 tokens in 5 messages)
    # and 5 more demo tokens (longer words, cut into more pieces), which no fit on our
    # count can tell apart (measured: 30 against 35, 14 %).
    assert sum(errors) / len(errors) <= 0.10, errors

    # Answers that report usage are still recorded exactly as the provider counted.
    with NewRecord(log, PATH) as new:
        got = via.chat.completions.create(model="llama", messages=user("And a pod?"),
                                          max_tokens=20)
    rec = new.record
    assert (rec["input_tokens"], rec["input_source"], rec["output_tokens"],
            rec["output_source"]) == (got.usage.prompt_tokens, "provider",
                                      got.usage.completion_tokens, "provider")
