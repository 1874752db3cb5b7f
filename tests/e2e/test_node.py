"""The node agent on a simulated node (privileged). Two "pods", each a network namespace
and a cgroup laid out as the kubelet does (kubepods.slice/.../kubepods-besteffort-pod<uid>
.slice/cri-containerd-<id>.scope) with a process in both, an "LLM host" namespace joined
to each pod by a veth pair, the fake Kubernetes API server (tests/k8s, the real
list/watch protocol) serving those pods and the policy ConfigMaps, and a real
`kube-gateway node` process. The official `ollama` client runs inside the pods. Editing
the fake's objects is the `kubectl annotate` a user would run.

Needs root, `ip` and `bpftool`: CI has them; elsewhere the test skips, saying why."""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, binary, free_port

sys.path.insert(0, str(ROOT / "tests" / "k8s"))
from fake_apiserver import FakeApiServer  # noqa: E402

HERE = Path(__file__).resolve().parent
TAG = f"kgwn{os.getpid() % 100000}"
NODE = "node-e2e"
NAMESPACE = "team-a"
ASKED, REWRITTEN = "llama3.2:1b", "gemma2:2b"
POD_PORT = 15001
PODS = {  # name: (uid, pod address, LLM address on its link)
    "chat-a": (str(uuid.uuid4()), "10.78.1.2", "10.78.1.1"),
    "chat-b": (str(uuid.uuid4()), "10.78.2.2", "10.78.2.1"),
}


def missing_privileges():
    if os.geteuid() != 0:
        return "needs root (network namespaces, cgroups, eBPF)"
    for tool in ("ip", "bpftool", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def cgroup_v2_root():
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split(" ")[0] == "cgroup2":
            return Path(pre.split(" ")[4])
    raise RuntimeError("no cgroup v2 mount")


def pod_object(name, annotations=None):
    uid, ip, _ = PODS[name]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid,
                     "labels": {"app": name}, "annotations": annotations or {}},
        "spec": {"nodeName": NODE, "serviceAccountName": f"sa-{name}",
                 "containers": [{"name": "app", "image": "python"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def policy_configmap(name, text, selector=None):
    meta = {"name": name, "namespace": NAMESPACE, "labels": {"kube-gateway.io/policy": "true"}}
    if selector:
        meta["annotations"] = {"kube-gateway.io/selector": selector}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"policy.yaml": text}}


class Node:
    """The simulated node: namespaces, cgroups, the LLM, the API server, the agent."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.base = cgroup_v2_root() / TAG
        self.procs, self.netns, self.cgroups = [], [], {}
        self.api = FakeApiServer()
        self.agent = None

    def ns(self, name):
        return f"{TAG}-{name}"

    def setup(self):
        self.api.start()
        for name in PODS:
            self.api.put(pod_object(name))
        # The API server names the UIDs (as a real one does); the kubelet lays out by them.
        self.uids = {name: self.api.get("pod", NAMESPACE, name)["metadata"]["uid"] for name in PODS}
        llm = self.ns("llm")
        sh("ip", "netns", "add", llm)
        self.netns.append(llm)
        sh("ip", "-n", llm, "link", "set", "lo", "up")
        for i, (name, (_, pod_ip, llm_ip)) in enumerate(PODS.items()):
            uid = self.uids[name]
            ns = self.ns(name)
            sh("ip", "netns", "add", ns)
            self.netns.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            host_if, pod_if = f"{TAG}l{i}", f"{TAG}p{i}"
            sh("ip", "link", "add", host_if, "netns", llm, "type", "veth", "peer", "name", pod_if,
               "netns", ns)
            sh("ip", "-n", llm, "addr", "add", f"{llm_ip}/24", "dev", host_if)
            sh("ip", "-n", llm, "link", "set", host_if, "up")
            sh("ip", "-n", ns, "addr", "add", f"{pod_ip}/24", "dev", pod_if)
            sh("ip", "-n", ns, "link", "set", pod_if, "up")
            # The kubelet's layout (systemd driver), and a process in cgroup and netns.
            pod_cg = (self.base / "kubepods.slice" / "kubepods-besteffort.slice"
                      / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
            container = pod_cg / f"cri-containerd-{uuid.uuid4().hex}.scope"
            container.mkdir(parents=True)
            self.cgroups[name] = container
            self.procs.append(subprocess.Popen(
                ["bash", "-c", f"echo $$ > {container}/cgroup.procs; "
                               f"exec nsenter --net=/run/netns/{ns} sleep infinity"]))
        (self.base / "agent").mkdir(parents=True)
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", llm, binary("ai-demo"), "serve", "--listen", "0.0.0.0:11434"],
            stdout=open(self.tmp / "demo.log", "wb"), stderr=subprocess.STDOUT))
        self.kubeconfig = self.tmp / "kubeconfig"
        self.api.write_kubeconfig(self.kubeconfig)
        self.admin = free_port()
        deadline = time.monotonic() + 15
        while b"listening" not in (self.tmp / "demo.log").read_bytes():
            assert time.monotonic() < deadline, "the demo LLM did not start"
            time.sleep(0.05)

    def start_agent(self):
        log = self.tmp / "agent.log"
        self.agent_log = log
        cmd = [binary("kube-gateway"), "--log-format", "json", "node",
               "--node-name", NODE, "--host-cgroup-root", str(self.base),
               "--listen", f"127.0.0.1:{POD_PORT}", "--admin", f"127.0.0.1:{self.admin}",
               "--store", f"sqlite://{self.tmp / 'usage.db'}", "--spool", str(self.tmp / "usage.spool")]
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), RUST_LOG="info")
        # The agent runs in a cgroup of its own (as its container would), outside the pods'.
        self.agent = subprocess.Popen(
            ["bash", "-c", f'echo $$ > {self.base / "agent"}/cgroup.procs; exec "$@"', "agent", *cmd],
            env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not ready(self.admin):
            assert self.agent.poll() is None, f"the agent exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the agent is not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)

    def call(self, pod, prompt="hi"):
        """The official ollama client inside `pod` (its netns and its cgroup)."""
        _, _, llm_ip = PODS[pod]
        out = subprocess.run(
            ["bash", "-c", f'echo $$ > {self.cgroups[pod]}/cgroup.procs; exec "$@"', "client",
             "nsenter", f"--net=/run/netns/{self.ns(pod)}", sys.executable,
             str(HERE / "pod_client.py"), "--host", f"http://{llm_ip}:11434", "--prompt", prompt],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def programs_on(self, pod):
        out = subprocess.run(["bpftool", "cgroup", "show", str(self.cgroups[pod].parent)],
                             capture_output=True, text=True, check=True).stdout
        return sum(1 for line in out.splitlines() if line.strip()[:1].isdigit())

    def teardown(self):
        if self.agent and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.agent.kill()
        for p in self.procs:
            p.kill()
            p.wait()
        self.api.stop()
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        # Deepest first: a cgroup directory goes only once it is empty.
        for d in sorted(self.base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                d.rmdir()
        self.base.rmdir()


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def until(what, check, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def attached_pods(node):
    """The pods the agent says it attached, from its log (JSON lines)."""
    pods = set()
    for line in node.agent_log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("message") == "gateway attached":
            pods.add(rec.get("pod"))
        elif rec.get("message") == "gateway detached":
            pods.discard(rec.get("pod"))
    return pods


def event_reasons(node, pod):
    return [e.get("reason") for e in node.api.events()
            if (e.get("regarding") or {}).get("name") == pod]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    reason = missing_privileges()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"privileged test cannot run in CI: {reason}")
        pytest.skip(reason)
    n = Node(tmp_path_factory.mktemp("node"))
    try:
        n.setup()
        n.start_agent()
        yield n
    finally:
        n.teardown()


def test_annotate_attach_policy_and_detach_on_a_simulated_node(node):
    # Nothing annotated: both pods reach the LLM as they are.
    assert node.call("chat-a")["model"] == ASKED
    assert node.programs_on("chat-a") == 0

    # kubectl annotate pod chat-a kube-gateway.io/ai=true kube-gateway.io/ai-model=gemma2:2b
    node.api.patch_annotations("pod", NAMESPACE, "chat-a", {
        "kube-gateway.io/ai": "true", "kube-gateway.io/ai-model": REWRITTEN})
    try:
        until("chat-a attached", lambda: "chat-a" in attached_pods(node))
    except AssertionError:
        print(subprocess.run(["find", str(node.base), "-maxdepth", "5", "-type", "d"],
                             capture_output=True, text=True).stdout)
        print(node.agent_log.read_text()[-2000:])
        raise
    a = node.call("chat-a")
    assert a["model"] == REWRITTEN, a
    assert node.call("chat-b")["model"] == ASKED, "the other pod is untouched"
    assert node.programs_on("chat-a") == 3 and node.programs_on("chat-b") == 0
    until("GatewayAttached", lambda: "GatewayAttached" in event_reasons(node, "chat-a"))
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert re.search(r"^kube_gateway_attached_pods\{[^}]*\} 1$", metrics, re.M), metrics
    access = [json.loads(line) for line in node.agent_log.read_text().splitlines()
              if '"message":"request"' in line]
    assert access and all(a["pod"] == "chat-a" and a["namespace"] == NAMESPACE
                          and a["service_account"] == "sa-chat-a" for a in access), access[-1:]

    # A policy ConfigMap selecting chat-a: its next request obeys it.
    node.api.put(policy_configmap("guard", "apiVersion: kube-gateway.io/v1alpha1\n"
                                  "promptRules:\n  - name: no-secrets\n"
                                  "    match: { literals: [launch codes] }\n    action: deny\n"
                                  "budgets:\n  - { name: pod-hourly, scope: pod, window: hour,"
                                  " limits: { totalTokens: 100000 } }\n",
                                  selector="app=chat-a"))
    until("the prompt rule", lambda: node.call("chat-a", "the launch codes please").get("status") == 403)
    assert node.call("chat-a")["model"] == REWRITTEN, "the ai-model annotation still applies"
    # The pod's budget is counted, by the pod's scope, and gauged.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin}/metrics", timeout=5) as r:
        metrics = r.read().decode()
    used = re.findall(r'^kube_gateway_budget_used\{[^}]*budget="pod-hourly"[^}]*scope="([^"]*)"[^}]*\} (\d+)$',
                      metrics, re.M)
    assert any("chat-a" in scope and int(v) > 0 for scope, v in used), metrics

    # A broken version: an Event says why, the last good policy stays.
    node.api.put(policy_configmap("guard", "apiVersion: kube-gateway.io/v1alpha1\n"
                                  "promptRules:\n  - name: bad\n    match: { regex: '(' }\n"
                                  "    action: deny\n", selector="app=chat-a"))
    until("PolicyInvalid", lambda: "PolicyInvalid" in event_reasons(node, "guard"))
    assert node.call("chat-a", "the launch codes please").get("status") == 403

    # Usage rows carry the pod's identity.
    until("usage rows", lambda: sqlite3.connect(node.tmp / "usage.db").execute(
        "SELECT COUNT(*) FROM usage_events").fetchone()[0] >= 3)
    rows = sqlite3.connect(node.tmp / "usage.db").execute(
        "SELECT DISTINCT namespace, pod FROM usage_events").fetchall()
    assert rows == [(NAMESPACE, "chat-a")], rows

    # kill -9 and restart: the hooks went with the process; the restart attaches again,
    # once.
    node.agent.send_signal(signal.SIGKILL)
    node.agent.wait(timeout=10)
    assert node.programs_on("chat-a") == 0, "no hook outlives the agent"
    assert node.call("chat-a")["model"] == ASKED
    node.start_agent()
    until("chat-a attached again", lambda: node.programs_on("chat-a") == 3)
    assert node.call("chat-a")["model"] == REWRITTEN
    assert node.programs_on("chat-a") == 3, "no duplicate hooks"

    # kubectl annotate pod chat-a kube-gateway.io/ai-
    node.api.patch_annotations("pod", NAMESPACE, "chat-a", {"kube-gateway.io/ai": None})
    until("chat-a detached", lambda: node.programs_on("chat-a") == 0)
    assert node.call("chat-a")["model"] == ASKED, "its next connection goes direct"
    until("GatewayDetached", lambda: "GatewayDetached" in event_reasons(node, "chat-a"))


def test_a_pod_without_its_cgroup_yet_is_retried_and_a_deleted_pod_detached(node):
    # The API says the pod runs before the kubelet made its cgroup: AttachFailed, then
    # the agent tries again and attaches once the cgroup has a process.
    obj = pod_object("chat-b", {"kube-gateway.io/ai": "true"})
    obj["metadata"].update(name="chat-c", labels={"app": "chat-c"})
    obj["metadata"].pop("uid")
    obj["status"]["podIP"] = "10.78.2.3"
    obj["status"]["podIPs"] = [{"ip": "10.78.2.3"}]
    node.api.put(obj)
    uid = node.api.get("pod", NAMESPACE, "chat-c")["metadata"]["uid"]
    until("AttachFailed", lambda: "AttachFailed" in event_reasons(node, "chat-c"))
    pod_cg = (node.base / "kubepods.slice" / "kubepods-besteffort.slice"
              / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
    container = pod_cg / "cri-containerd-c.scope"
    container.mkdir(parents=True)
    node.cgroups["chat-c"] = container
    # Its process lives in chat-b's network namespace (unattached: the port is free).
    node.procs.append(subprocess.Popen(
        ["bash", "-c", f"echo $$ > {container}/cgroup.procs; "
                       f"exec nsenter --net=/run/netns/{node.ns('chat-b')} sleep infinity"]))
    until("chat-c attached on a retry", lambda: node.programs_on("chat-c") == 3)
    until("GatewayAttached", lambda: "GatewayAttached" in event_reasons(node, "chat-c"))
    # kubectl delete pod chat-c: the agent detaches and forgets it.
    node.api.delete("pod", NAMESPACE, "chat-c")
    until("chat-c detached", lambda: node.programs_on("chat-c") == 0)
    until("GatewayDetached", lambda: "GatewayDetached" in event_reasons(node, "chat-c"))


HOLDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], 11434), timeout=5)
print("connected", flush=True)
s.settimeout(30)
try:
    data = s.recv(1)
    print("closed" if not data else "data", flush=True)
except socket.timeout:
    print("timeout", flush=True)
except OSError as e:
    print("destroyed", e.errno, flush=True)
"""


def test_the_netflush_annotation_destroys_connections_that_predate_the_capture(node):
    # A keep-alive client's connection, open before the pod is annotated, would bypass
    # the gateway until it closes; netflush destroys it so the client reconnects.
    _, _, llm_ip = PODS["chat-b"]
    holder = subprocess.Popen(
        ["bash", "-c", f'echo $$ > {node.cgroups["chat-b"]}/cgroup.procs; exec "$@"', "holder",
         "nsenter", f"--net=/run/netns/{node.ns('chat-b')}", sys.executable, "-c", HOLDER, llm_ip],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "connected"
        node.api.patch_annotations("pod", NAMESPACE, "chat-b", {
            "kube-gateway.io/ai": "true", "kube-gateway.io/netflush": "true"})
        until("chat-b attached", lambda: node.programs_on("chat-b") == 3)
        out, _ = holder.communicate(timeout=20)
        assert out.startswith("destroyed"), out
        # The client's next connection goes through the gateway.
        assert node.call("chat-b")["model"] == ASKED, "no ai-model: the model is kept"
        assert "chat-b" in attached_pods(node)
    finally:
        holder.kill()
        node.api.patch_annotations("pod", NAMESPACE, "chat-b", {
            "kube-gateway.io/ai": None, "kube-gateway.io/netflush": None})
    until("chat-b detached", lambda: node.programs_on("chat-b") == 0)


def test_sigterm_detaches_and_exits_promptly(node):
    # A DaemonSet rollout sends SIGTERM: the agent detaches its pods, says so, and exits
    # well within the kubelet's 30 s grace period.
    node.api.patch_annotations("pod", NAMESPACE, "chat-a", {"kube-gateway.io/ai": "true"})
    until("chat-a attached", lambda: node.programs_on("chat-a") == 3)
    def event_writes():
        return len(node.api.requests(resource="events", verb="create")) + \
            len(node.api.requests(resource="events", verb="patch"))
    writes_before = event_writes()
    started = time.monotonic()
    node.agent.send_signal(signal.SIGTERM)
    assert node.agent.wait(timeout=15) == 0
    assert time.monotonic() - started < 10, "exited, but slowly"
    assert node.programs_on("chat-a") == 0
    # GatewayDetached was posted (a repeat of an earlier one is counted on it, a PATCH).
    assert event_writes() > writes_before
    assert "GatewayDetached" in event_reasons(node, "chat-a")
