"""Token budgets with the official clients: a stream that crosses the budget line ends
normally with `length` (no exception, no hang), and once the budget is spent the clients
raise their rate-limit errors carrying the gateway's Retry-After."""

import signal

import ollama
import openai
import pytest

from conftest import binary, free_port, start


def gateway_with(tmp_path, limits, store="none"):
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: kube-gateway.io/v1alpha1\n"
        f"budgets:\n  - {{ name: pod-daily, scope: pod, window: day, limits: {limits} }}\n")
    demo_port, gw_port = free_port(), free_port()
    procs = [
        start([binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
              demo_port, "demo", tmp_path / "demo.log"),
        start(gateway_args(tmp_path, gw_port, demo_port, store), gw_port, "gateway",
              tmp_path / "gw.log"),
    ]
    return f"http://127.0.0.1:{gw_port}", procs


def gateway_args(tmp_path, gw_port, demo_port, store):
    return [binary("kube-gateway"), "run", "--listen", f"127.0.0.1:{gw_port}",
            "--upstream", f"127.0.0.1:{demo_port}", "--store", store,
            "--spool", str(tmp_path / "usage.spool"), "--policy", str(tmp_path / "policy.yaml")]


@pytest.fixture()
def stop():
    procs = []
    yield procs
    for p in procs:
        p.terminate()
        p.wait(timeout=15)


def test_openai_stream_crossing_the_budget_ends_with_length(tmp_path, stop):
    url, procs = gateway_with(tmp_path, "{ totalTokens: 10 }")
    stop.extend(procs)
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
    chunks = list(oa.chat.completions.create(
        model="m", stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Demo reply")
    with pytest.raises(openai.RateLimitError) as err:
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 429
    assert int(err.value.response.headers["retry-after"]) > 0
    assert "pod-daily" in err.value.message


def test_ollama_stream_crossing_the_budget_ends_with_length(tmp_path, stop):
    url, procs = gateway_with(tmp_path, "{ outputTokens: 5 }")
    stop.extend(procs)
    client = ollama.Client(host=url, timeout=10)
    parts = list(client.chat(model="m", stream=True, messages=[{"role": "user", "content": "hi"}]))
    assert parts[-1].done and parts[-1].done_reason == "length"
    assert len(parts) == 6, "five tokens, then the end"
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="m", prompt="hi")
    assert err.value.status_code == 429 and "pod-daily" in err.value.error


def test_a_restarted_gateway_keeps_its_spent_budget(tmp_path, stop):
    """With its own (SQLite) store, a gateway starts its budgets from the window's stored
    usage: a restart does not hand the budget out again."""
    store = f"sqlite://{tmp_path}/usage.db"
    url, procs = gateway_with(tmp_path, "{ requests: 3 }", store)
    stop.extend(procs)
    oa = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
    ask = lambda: oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    for _ in range(3):
        ask()
    with pytest.raises(openai.RateLimitError):
        ask()
    gw = procs[1]
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(timeout=30) == 0
    port = int(url.rsplit(":", 1)[1])
    demo_port = int(procs[0].args[-1].rsplit(":", 1)[1])
    stop.append(start(gateway_args(tmp_path, port, demo_port, store), port, "gateway again",
                      tmp_path / "gw2.log"))
    with pytest.raises(openai.RateLimitError) as err:
        ask()
    assert "pod-daily" in err.value.message
