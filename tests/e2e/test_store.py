"""The usage store through the real binaries: a gateway with two serving threads takes
requests on many connections, is stopped with SIGTERM, and `kube-gateway usage` then
counts every request with the tokens the LLM reported, in SQLite and in PostgreSQL."""

import json
import os
import signal
import subprocess
import time
import urllib.request

import pytest

from conftest import binary, free_port, start


def store_urls(tmp_path):
    urls = [f"sqlite://{tmp_path}/usage.db"]
    pg = os.environ.get("KGW_TEST_POSTGRES_URL")
    if pg:
        urls.append(pg)
    elif os.environ.get("CI") == "true":
        pytest.fail("CI must provide KGW_TEST_POSTGRES_URL")
    else:
        print("PostgreSQL part skipped: KGW_TEST_POSTGRES_URL is not set")
    return urls


def fresh_postgres(url):
    """A database of its own for this run, on the server `url` names."""
    base, _ = url.rsplit("/", 1)
    name = f"kgw_e2e_{os.getpid()}"
    for sql in (f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"):
        subprocess.run(["psql", url, "-q", "-c", sql], check=True, capture_output=True)
    return f"{base}/{name}"


@pytest.mark.parametrize("which", [0, 1])
def test_every_request_is_stored_after_a_graceful_stop(tmp_path, which):
    urls = store_urls(tmp_path)
    if which >= len(urls):
        pytest.skip("no PostgreSQL here (KGW_TEST_POSTGRES_URL unset)")
    url = urls[which] if which == 0 else fresh_postgres(urls[which])
    demo_port, gw_port = free_port(), free_port()
    demo = start([binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
                 demo_port, "demo", tmp_path / "demo.log")
    gw = start([binary("kube-gateway"), "run", "--threads", "2",
                "--listen", f"127.0.0.1:{gw_port}", "--upstream", f"127.0.0.1:{demo_port}",
                "--store", url, "--spool", str(tmp_path / "usage.spool"),
                "--pod-namespace", "team-a", "--pod-name", "app-1"],
               gw_port, "gateway", tmp_path / "gateway.log")
    try:
        eval_total = prompt_total = 0
        for i in range(60):
            body = json.dumps({"model": "llama3.2:1b", "prompt": f"question {i}", "stream": False}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{gw_port}/api/generate", data=body,
                                         headers={"Connection": "close"})
            with urllib.request.urlopen(req) as r:
                answer = json.load(r)
            eval_total += answer["eval_count"]
            prompt_total += answer["prompt_eval_count"]
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
    finally:
        if gw.poll() is None:
            gw.kill()
        demo.terminate()
        demo.wait(timeout=15)
    out = subprocess.run([binary("kube-gateway"), "usage", "--store", url, "--json"],
                         check=True, capture_output=True, text=True).stdout
    totals = json.loads(out)
    assert totals == [{"namespace": "team-a", "pod": "app-1", "model": "llama3.2:1b",
                       "requests": 60, "input_tokens": prompt_total,
                       "output_tokens": eval_total}], (tmp_path / "gateway.log").read_text()[-2000:]


def test_a_hard_kill_loses_at_most_the_last_batch_window(tmp_path):
    """SIGKILL, no flush: rows older than one batch window (200 ms) plus the recorder's
    tick (20 ms) are already committed; only the newest may be lost."""
    url = f"sqlite://{tmp_path}/usage.db"
    demo_port, gw_port = free_port(), free_port()
    demo = start([binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
                 demo_port, "demo", tmp_path / "demo.log")
    gw = start([binary("kube-gateway"), "run", "--threads", "2",
                "--listen", f"127.0.0.1:{gw_port}", "--upstream", f"127.0.0.1:{demo_port}",
                "--store", url, "--spool", str(tmp_path / "usage.spool")],
               gw_port, "gateway", tmp_path / "gateway.log")

    def call(i):
        body = json.dumps({"model": "m", "prompt": f"q {i}", "stream": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{gw_port}/api/generate", data=body)
        with urllib.request.urlopen(req) as r:
            r.read()

    try:
        for i in range(30):
            call(i)
        time.sleep(0.5)  # more than a batch window: these 30 are committed
        for i in range(30, 40):
            call(i)
        gw.kill()
        gw.wait(timeout=10)
    finally:
        demo.terminate()
        demo.wait(timeout=15)
    out = subprocess.run([binary("kube-gateway"), "usage", "--store", url, "--json"],
                         check=True, capture_output=True, text=True).stdout
    stored = sum(t["requests"] for t in json.loads(out))
    print(f"hard kill: {stored} of 40 rows stored, {40 - stored} lost (sent in the last window)")
    assert 30 <= stored <= 40
