"""Transparent mode (privileged): in a network namespace, iptables REDIRECT sends a
workload's connections to the gateway, which finds where they were going with
SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6), rewrites the model and forwards
them there. The official clients are the workload and are not told about the gateway.

Needs root, `ip` and `iptables`: CI has them; elsewhere the tests skip, saying why."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REWRITTEN, binary

HERE = Path(__file__).resolve().parent
NS = f"kgw-e2e-{os.getpid()}"
LLM4, APP4, LLM6, APP6 = "10.77.0.1", "10.77.0.2", "fd77::1", "fd77::2"
GATEWAY_PORT = 18000


def missing_privileges():
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables", "ip6tables"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def in_ns(*args):
    return ["ip", "netns", "exec", NS, *args]


@pytest.fixture(scope="module")
def netns(tmp_path_factory):
    reason = missing_privileges()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"privileged test cannot run in CI: {reason}")
        pytest.skip(reason)
    logs = tmp_path_factory.mktemp("netns")
    procs = []
    sh("ip", "netns", "add", NS)
    try:
        sh(*in_ns("ip", "link", "set", "lo", "up"))
        for addr in (f"{LLM4}/32", f"{APP4}/32"):
            sh(*in_ns("ip", "addr", "add", addr, "dev", "lo"))
        for addr in (f"{LLM6}/128", f"{APP6}/128"):
            sh(*in_ns("ip", "addr", "add", addr, "dev", "lo", "nodad"))
        # Only the workload's connections (by source address) are captured; the gateway's
        # own upstream connections leave from the LLM's address and are not.
        sh(*in_ns("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", APP4,
                  "-j", "REDIRECT", "--to-ports", str(GATEWAY_PORT)))
        sh(*in_ns("ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", APP6,
                  "-j", "REDIRECT", "--to-ports", str(GATEWAY_PORT)))
        demo_log, gw_log = logs / "demo.log", logs / "gateway.log"
        procs.append(subprocess.Popen(
            in_ns(binary("ai-demo"), "serve", "--listen", "[::]:11434"),
            stdout=open(demo_log, "wb"), stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(
            in_ns(binary("kube-gateway"), "--log-format", "json", "run",
                  "--listen", f"[::]:{GATEWAY_PORT}", "--model", REWRITTEN, "--threads", "1",
                  "--store", "none"),
            stdout=open(gw_log, "wb"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 20
        while b"gateway ready" not in gw_log.read_bytes() or b"listening" not in demo_log.read_bytes():
            assert time.monotonic() < deadline, "servers did not start in the namespace"
            assert all(p.poll() is None for p in procs), "a server exited"
            time.sleep(0.05)
        yield gw_log
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=15)
        subprocess.run(["ip", "netns", "del", NS], check=False)


def call(source, host):
    out = subprocess.run(in_ns(sys.executable, str(HERE / "netns_client.py"),
                               "--source", source, "--host", host),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def access(gw_log):
    return [r for r in map(json.loads, gw_log.read_text().splitlines())
            if r.get("target") == "access"]


def wait_access(gw_log, count):
    deadline = time.monotonic() + 10
    while len(access(gw_log)) < count:
        assert time.monotonic() < deadline, f"expected {count} access records"
        time.sleep(0.02)
    return access(gw_log)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_captured_workload_is_rewritten_and_reaches_its_original_destination(netns, family):
    source, llm, dest = {
        "ipv4": (APP4, f"http://{LLM4}:11434", f"{LLM4}:11434"),
        "ipv6": (APP6, f"http://[{LLM6}]:11434", f"[{LLM6}]:11434"),
    }[family]
    before = len(access(netns))
    got = call(source, llm)
    assert got["ollama_model"] == REWRITTEN and got["openai_model"] == REWRITTEN
    assert got["ollama_eval_count"] == 5 and got["openai_tokens"] == 5
    records = wait_access(netns, before + 2)[before:]
    assert {r["destination"] for r in records} == {dest}, "SO_ORIGINAL_DST gave the LLM's address"
    assert {r["used_model"] for r in records} == {REWRITTEN}
    assert all(r["input_source"] == "provider" for r in records)


def test_connections_outside_the_capture_are_not_touched(netns):
    before = len(access(netns))
    got = call(LLM4, f"http://{LLM4}:11434")  # not the workload's source: not redirected
    assert got["ollama_model"] == "llama3.2:1b" and got["openai_model"] == "gpt-4o-mini"
    time.sleep(0.2)
    assert len(access(netns)) == before, "the gateway saw nothing"
