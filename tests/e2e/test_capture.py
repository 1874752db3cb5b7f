"""eBPF capture through the real binaries (privileged): an "LLM host" network namespace
runs the demo server; an "app host" namespace runs the gateway (in a cgroup of its own)
and an unmodified official `ollama` client in the workload cgroup. The client talks to
the LLM host's address, the gateway receives the connection, finds the original
destination and forwards it with the model rewritten, over IPv4 and IPv6. A process
outside the workload cgroup, and the gateway's own upstream connection, are not
redirected."""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from conftest import binary

NS = uuid.uuid4().hex[:6]
LLM, APP = f"kgwllm{NS}", f"kgwapp{NS}"


def privileged():
    if os.geteuid() == 0:
        return
    if os.environ.get("CI") == "true":
        pytest.fail("CI must run the eBPF capture tests as root")
    pytest.skip("the eBPF capture tests need root (BPF, cgroups, network namespaces)")


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def cgroup_root():
    for line in open("/proc/self/mountinfo"):
        pre, post = line.split(" - ", 1)
        if post.split()[0] == "cgroup2":
            return pre.split()[4]
    pytest.fail("no cgroup v2 hierarchy")


def in_ns(ns, cgroup, args):
    """argv running `args` in network namespace `ns` (nsenter keeps /sys, so cgroup paths
    stay visible), in `cgroup` when given."""
    enter = f'echo $$ > {cgroup}/cgroup.procs; ' if cgroup else ""
    return ["bash", "-c", enter + 'exec nsenter --net=/run/netns/"$0" "$@"', ns, *args]


def wait_ready(proc, log):
    """Waits for a gateway to log that it is ready, or fails showing its log."""
    deadline = time.monotonic() + 20
    while b"gateway ready" not in log.read_bytes():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def rmdir(path):
    """Removes a cgroup once its last process has left (that takes a moment)."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    privileged()
    logs = tmp_path_factory.mktemp("capture")
    sh("ip", "netns", "add", LLM)
    sh("ip", "netns", "add", APP)
    base = os.path.join(cgroup_root(), f"kgw-e2e-{NS}")
    cg = {k: os.path.join(base, k) for k in ("app", "gateway", "outside")}
    for d in cg.values():
        os.makedirs(d, exist_ok=True)
    procs = []
    try:
        sh("ip", "link", "add", f"v{NS}a", "netns", APP, "type", "veth", "peer", f"v{NS}l", "netns", LLM)
        for ns, dev, v4, v6 in ((APP, f"v{NS}a", "10.77.0.1/24", "fd77::1/64"),
                                (LLM, f"v{NS}l", "10.77.0.2/24", "fd77::2/64")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "addr", "add", v4, "dev", dev)
            sh("ip", "-n", ns, "addr", "add", v6, "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        demo = subprocess.Popen(in_ns(LLM, None, [binary("ai-demo"), "serve", "--listen", "[::]:11434"]),
                                stdout=open(logs / "demo.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(demo)
        gw = subprocess.Popen(
            in_ns(APP, cg["gateway"], [binary("kube-gateway"), "run", "--threads", "1",
                                       "--listen", "127.0.0.1:15001", "--admin", "127.0.0.1:15020",
                                       "--cgroup", cg["app"], "--model", "rewritten-by-ebpf",
                                       "--store", "none"]),
            stdout=open(logs / "gateway.log", "wb"), stderr=subprocess.STDOUT)
        procs.append(gw)
        wait_ready(gw, logs / "gateway.log")
        yield cg, logs
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=15)
        for ns in (LLM, APP):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for d in list(cg.values()) + [base]:
            rmdir(d)


def ollama_chat(cgroup, host):
    """The official ollama client, unmodified, in the app namespace (and `cgroup`)."""
    code = ("import json, ollama\n"
            f"r = ollama.Client(host={host!r}, timeout=10).chat(model='llama3.2:1b', "
            "messages=[{'role': 'user', 'content': 'hello'}])\n"
            "print(json.dumps({'model': r.model, 'text': r.message.content}))\n")
    out = subprocess.run(in_ns(APP, cgroup, [sys.executable, "-c", code]),
                         check=True, capture_output=True, text=True, timeout=30).stdout
    return json.loads(out)


def llm_saw():
    """The models the demo LLM received, in order (asked inside its namespace)."""
    code = ("import json, urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:11434/demo/requests').read().decode())")
    out = subprocess.run(in_ns(LLM, None, [sys.executable, "-c", code]),
                         check=True, capture_output=True, text=True).stdout
    return [r["model"] for r in json.loads(out) if r["path"] == "/api/chat"]


@pytest.mark.parametrize("host", ["http://10.77.0.2:11434", "http://[fd77::2]:11434"])
def test_a_workload_in_the_cgroup_is_captured_and_reaches_its_destination(hosts, host):
    cg, logs = hosts
    before = len(llm_saw())
    answer = ollama_chat(cg["app"], host)
    assert answer["text"].startswith("Demo reply")
    seen = llm_saw()[before:]
    assert seen == ["rewritten-by-ebpf"], (seen, (logs / "gateway.log").read_text()[-3000:])


def test_outside_the_cgroup_nothing_is_redirected(hosts):
    cg, _ = hosts
    before = len(llm_saw())
    ollama_chat(cg["outside"], "http://10.77.0.2:11434")
    assert llm_saw()[before:] == ["llama3.2:1b"], "went straight to the LLM, model untouched"


KEEPALIVE_CLIENT = """
import json, sys, ollama
c = ollama.Client(host='http://10.77.0.2:11434', timeout=10)
ask = lambda: c.chat(model='llama3.2:1b', messages=[{'role': 'user', 'content': 'hi'}])
ask()
print('connected', flush=True)
sys.stdin.readline()
ask()
print('done', flush=True)
"""


@pytest.mark.parametrize("netflush", [False, True])
def test_a_keepalive_client_from_before_the_capture_needs_netflush(hosts, netflush, tmp_path):
    """Connected before the gateway attached: without netflush its next request still
    goes straight to the LLM on the old connection; with netflush that connection is
    destroyed, the client reconnects, and the new connection is captured."""
    cg, _ = hosts
    name = f"keepalive-{int(netflush)}"
    app, gwcg = os.path.join(os.path.dirname(cg["app"]), name), os.path.join(os.path.dirname(cg["app"]), name + "-gw")
    os.makedirs(app, exist_ok=True)
    os.makedirs(gwcg, exist_ok=True)
    client = subprocess.Popen(in_ns(APP, app, [sys.executable, "-c", KEEPALIVE_CLIENT]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    gw = None
    try:
        assert client.stdout.readline().strip() == "connected"
        before = len(llm_saw())
        log = tmp_path / "gateway.log"
        port = 15002 + int(netflush)
        gw = subprocess.Popen(
            in_ns(APP, gwcg, [binary("kube-gateway"), "--log-format", "json", "run", "--threads", "1",
                              "--listen", f"127.0.0.1:{port}", "--cgroup", app,
                              "--model", "rewritten-by-ebpf", "--store", "none"]
                  + (["--netflush"] if netflush else [])),
            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        wait_ready(gw, log)
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "done"
        assert client.wait(timeout=10) == 0
        seen = llm_saw()[before:]
        if netflush:
            flushed = [json.loads(x) for x in log.read_text().splitlines() if "netflush" in x]
            assert flushed and flushed[0]["destroyed"] == 1, log.read_text()
            assert seen == ["rewritten-by-ebpf"], "reconnected through the gateway"
        else:
            assert seen == ["llama3.2:1b"], "the old connection bypassed the gateway"
    finally:
        for p in (client, gw):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=15)
        for d in (app, gwcg):
            rmdir(d)


LISTENER = """
import socket, struct, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 15001))
s.listen(8)
print('listening', flush=True)
sys.stdin.readline()  # accept only once both clients are connected
c, peer = s.accept()
family, port, ip = struct.unpack('!HH4s8x', c.getsockopt(socket.SOL_IP, 80, 16))
print(f'{socket.inet_ntoa(ip)}:{port} from {peer[1]}', flush=True)
"""

CLIENT = """
import socket, sys
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(('127.0.0.1', 40404))
c.connect((sys.argv[1], int(sys.argv[2])))
print('connected', flush=True)
sys.stdin.readline()
"""


def test_two_namespaces_using_one_source_port_get_their_own_destinations(hosts):
    """Two pods' clients connect at once from the same address and source port (each in
    its own network namespace) to different servers: the records do not collide."""
    cg, _ = hosts
    spaces = [f"kgwa{NS}", f"kgwb{NS}"]
    dests = {spaces[0]: ("10.88.0.1", 1111), spaces[1]: ("10.88.0.2", 2222)}
    procs = []
    try:
        listeners = {}
        for ns in spaces:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # In the gateway's cgroup: its getsockopt hook answers these listeners.
            p = subprocess.Popen(in_ns(ns, cg["gateway"], [sys.executable, "-c", LISTENER]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "listening"
            listeners[ns] = p
        clients = []
        for ns in spaces:
            ip, port = dests[ns]
            c = subprocess.Popen(in_ns(ns, cg["app"], [sys.executable, "-c", CLIENT, ip, str(port)]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(c)
            clients.append(c)
        for c in clients:
            assert c.stdout.readline().strip() == "connected"
        # Both connections are established with identical addresses and ports now.
        for ns in spaces:
            listeners[ns].stdin.write("\n")
            listeners[ns].stdin.flush()
            ip, port = dests[ns]
            assert listeners[ns].stdout.readline().strip() == f"{ip}:{port} from 40404"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
        for ns in spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_gateways_own_upstream_connection_is_never_redirected(hosts, tmp_path):
    """The gateway here runs inside the very cgroup it captures: only the SO_MARK on its
    upstream sockets keeps its connection to the LLM from landing back on itself."""
    cg, _ = hosts
    both = os.path.join(os.path.dirname(cg["app"]), "self")
    os.makedirs(both, exist_ok=True)
    log = tmp_path / "gateway.log"
    gw = subprocess.Popen(
        in_ns(APP, both, [binary("kube-gateway"), "run", "--threads", "1",
                          "--listen", "127.0.0.1:15009", "--cgroup", both, "--gateway-cgroup", both,
                          "--model", "through-a-marked-socket", "--store", "none"]),
        stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        wait_ready(gw, log)
        before = len(llm_saw())
        ollama_chat(both, "http://10.77.0.2:11434")
        assert llm_saw()[before:] == ["through-a-marked-socket"], log.read_text()[-2000:]
    finally:
        gw.terminate()
        gw.wait(timeout=15)
        rmdir(both)
