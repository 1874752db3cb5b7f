"""The ClusterRole against the node agent's real requests, and the DaemonSet's
capabilities against what the agent really needs.

A real `kube-gateway node` runs against the fake Kubernetes API server (tests/k8s, the
real list/watch protocol, with a request log) with exactly the capabilities the rendered
DaemonSet adds (setpriv: bounding set, no inheritable, no_new_privs, as a container
runtime does with `drop: [ALL]` + `add: [...]`). The node holds one "pod" (a network
namespace and a kubelet-like cgroup with a process running as nobody, as most pods
run) and the API server two annotated pods: that one, and one whose cgroup is not on
the node (AttachFailed, again on each retry: a repeat). Un-annotating the first detaches
it. Every request the agent made must be allowed by a ClusterRole rule, and every rule
must have been used.

Then the agent runs again once per capability, without it, and the test records what
happens (docs/deploy.md, "When a privilege is missing", says the same).

Needs root, cgroup v2, `ip`, `setpriv` and the agent binary (KGW_BINARY, or
target/<KGW_PROFILE or debug>/kube-gateway); skips without them, fails under CI=true."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from deploy_helpers import ROOT, cluster_role_rules, render, skip_or_fail

sys.path.insert(0, str(ROOT / "tests" / "k8s"))
from fake_apiserver import FakeApiServer  # noqa: E402

NODE = "node-rbac"
NAMESPACE = "team-rbac"
TAG = f"kgwr{os.getpid() % 100000}"
NOBODY = 65534
HEADER = "apiVersion: kube-gateway.io/v1alpha1\nkind: LlmPolicy\n"
# Requests every authenticated user may make (the system:discovery and
# system:public-info-viewer ClusterRoles): no rule of ours needed.
DISCOVERY = ("/version", "/api", "/apis", "/healthz", "/livez", "/readyz")


def binary():
    path = os.environ.get("KGW_BINARY") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        / os.environ.get("KGW_PROFILE", "debug") / "kube-gateway")
    return path if Path(path).exists() else None


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cgroup_v2_root():
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if post.split(" ")[0] == "cgroup2":
            return Path(pre.split(" ")[4])
    return None


def missing():
    if os.geteuid() != 0:
        return "needs root (cgroups, a network namespace, eBPF)"
    for tool in ("ip", "setpriv", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if cgroup_v2_root() is None:
        return "needs cgroup v2"
    if binary() is None:
        return "needs the kube-gateway binary: cargo build (or set KGW_BINARY)"
    return None


def manifest_capabilities():
    pod = next(o for o in render("deploy") if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    caps = pod["containers"][0]["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"]
    return caps["add"]


def pod_object(name, uid, annotations, ip):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": uid,
                         "labels": {"app": name}, "annotations": annotations},
            "spec": {"nodeName": NODE, "serviceAccountName": "default",
                     "containers": [{"name": "app", "image": "python"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def policy(name, text):
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"kube-gateway.io/policy": "true"}},
            "data": {"policy.yaml": text}}


class Node:
    """One pod's worth of node: a cgroup tree as the kubelet lays it out, a process in
    its own network namespace running as nobody; the fake API server."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.base = cgroup_v2_root() / TAG
        self.procs = []
        self.api = FakeApiServer().start()
        self.kubeconfig = self.api.write_kubeconfig(tmp / "kubeconfig")
        served = self.api.put(pod_object("served", str(uuid.uuid4()), {}, "10.79.0.2"))
        self.uid = served["metadata"]["uid"]
        pod_cg = (self.base / "kubepods.slice" / "kubepods-besteffort.slice"
                  / f"kubepods-besteffort-pod{self.uid.replace('-', '_')}.slice")
        container = pod_cg / f"cri-containerd-{uuid.uuid4().hex}.scope"
        container.mkdir(parents=True)
        (self.base / "agent").mkdir()
        self.procs.append(subprocess.Popen(
            ["bash", "-c", f"echo $$ > {container}/cgroup.procs; exec unshare --net sh -c "
                           f"'ip link set lo up; exec setpriv --reuid {NOBODY} --regid {NOBODY} "
                           f"--clear-groups sleep infinity'"]))
        deadline = time.monotonic() + 10
        while not any(p.strip() and Path(f"/proc/{p.strip()}/comm").read_text().strip() == "sleep"
                      for p in (container / "cgroup.procs").read_text().split()):
            assert time.monotonic() < deadline, "the pod's process did not start"
            time.sleep(0.05)
        # Not on this node: its cgroup is nowhere (AttachFailed, repeated on each retry).
        self.api.put(pod_object("absent", str(uuid.uuid4()), {"kube-gateway.io/ai": "true"},
                                "10.79.0.3"))
        self.api.put(policy("rewrite", HEADER + "models:\n  rewrite:\n    - { from: '*', to: gemma2:2b }\n"))
        self.api.put(policy("broken", HEADER + "models: [not, a, mapping]\n"))  # PolicyInvalid

    def agent(self, caps, name, wrap=()):
        """The agent with exactly `caps` (as the DaemonSet's container gets them);
        `wrap`: a command it runs under (e.g. a PID namespace of its own)."""
        log = self.tmp / f"agent-{name}.log"
        admin = free_port()
        cmd = [binary(), "--log-format", "json", "node", "--node-name", NODE,
               "--host-cgroup-root", str(self.base), "--listen", f"127.0.0.1:{free_port()}",
               "--admin", f"127.0.0.1:{admin}", "--store", f"sqlite://{self.tmp / name}.db",
               "--spool", str(self.tmp / f"{name}.spool")]
        bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), RUST_LOG="info")
        proc = subprocess.Popen(
            ["bash", "-c", f'echo $$ > {self.base / "agent"}/cgroup.procs; exec "$@"', "agent",
             *wrap, "setpriv", "--inh-caps=-all", f"--bounding-set={bounding}", "--no-new-privs",
             *cmd], env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        return proc, admin, log

    def teardown(self):
        for p in self.procs:
            p.kill()
            p.wait()
        self.api.stop()
        for d in sorted(self.base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                rmdir_when_empty(d)
        rmdir_when_empty(self.base)


def rmdir_when_empty(cgroup, seconds=10):
    """Removes a cgroup once its processes are gone: a process killed inside a PID
    namespace of its own (unshare --kill-child) exits after the unshare that waited for
    it, so its cgroup can be busy for a moment after the kill."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            cgroup.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def until(what, check, proc, log, timeout=30):
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the agent exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out: {what}\n{log.read_text()[-3000:]}"
        time.sleep(0.1)


def stop(proc, timeout=30):
    """SIGTERM, as the kubelet sends; SIGKILL after `timeout` (its grace period)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reasons(api, pod=None):
    return [e["reason"] for e in api.events()
            if pod is None or (e.get("regarding") or {}).get("name") == pod]


@pytest.fixture
def node(tmp_path):
    why = missing()
    if why:
        skip_or_fail(why)
    n = Node(tmp_path)
    try:
        yield n
    finally:
        n.teardown()


def test_every_api_call_of_the_agent_is_allowed_and_every_rule_is_used(node):
    caps = manifest_capabilities()
    rules = cluster_role_rules(render("deploy"))
    api = node.api
    proc, admin, log = node.agent(caps, "rbac")
    try:
        until("ready", lambda: ready(admin), proc, log)
        until("AttachFailed on the absent pod", lambda: "AttachFailed" in reasons(api, "absent"),
              proc, log)
        until("PolicyInvalid", lambda: "PolicyInvalid" in reasons(api, "broken"), proc, log)
        api.patch_annotations("pod", NAMESPACE, "served", {"kube-gateway.io/ai": "true"})
        until("GatewayAttached on the served pod",
              lambda: "GatewayAttached" in reasons(api, "served"), proc, log)
        # The absent pod's retries (every 2 s) repeat the same Event: a series patch.
        until("a repeated Event", lambda: api.requests(verb="patch", resource="events"),
              proc, log)
        api.patch_annotations("pod", NAMESPACE, "served", {"kube-gateway.io/ai": None})
        until("GatewayDetached", lambda: "GatewayDetached" in reasons(api, "served"), proc, log)
    finally:
        # The request log is complete once the Events are in; how the agent stops is
        # test_the_agent_stops_on_sigterm's business.
        stop(proc, timeout=5)
    made, refused, other = set(), [], []
    for r in api.requests():
        if r["resource"] is None:
            other.append(r["path"])
            continue
        call = (r["group"] or "", r["resource"], r["verb"])
        made.add(call)
        if call not in rules:
            refused.append((call, r["path"]))
        assert r.get("status") is None or r["status"] < 300, r  # watches log no status
    print("API calls of the agent (group, resource, verb):", sorted(made))
    assert not refused, f"calls the ClusterRole does not allow: {refused}"
    assert made == rules, f"rules never used: {sorted(rules - made)}"
    assert all(p in DISCOVERY for p in other), other


# What the agent does without each capability the DaemonSet adds, as measured here
# (docs/deploy.md, "When a privilege is missing").
WITHOUT = {
    # bpf(2) is refused (map creation needs CAP_BPF; with CAP_BPF alone the verifier
    # refuses the programs' pointer arithmetic, which needs CAP_PERFMON), and setns needs
    # it anyway: the agent exits at start ("Error: eBPF: cannot load ...").
    "SYS_ADMIN": "exits 1",
    # Loading and attaching work (SYS_ADMIN covers them); SO_MARK on upstream sockets
    # and netflush do not: test_so_mark_needs_net_admin.
    "NET_ADMIN": "attaches",
    # The pod's process runs as another user: its /proc/<pid>/ns/net cannot be opened.
    "SYS_PTRACE": "AttachFailed",
}


def outcome_without(node, caps, wrap=()):
    node.api.patch_annotations("pod", NAMESPACE, "served", {"kube-gateway.io/ai": "true"})
    proc, _, log = node.agent(caps, "without", wrap)
    deadline = time.monotonic() + 30
    outcome = None
    while time.monotonic() < deadline and outcome is None:
        if "GatewayAttached" in reasons(node.api, "served"):
            outcome = "attaches"
        elif "AttachFailed" in reasons(node.api, "served"):
            outcome = "AttachFailed"
        elif proc.poll() is not None:
            outcome = f"exits {proc.returncode}"
        time.sleep(0.2)
    stop(proc, timeout=5)
    notes = [e.get("note") for e in node.api.events()
             if (e.get("regarding") or {}).get("name") == "served"]
    return outcome, log.read_text(), notes


def test_the_manifest_adds_exactly_the_capabilities_measured_here():
    assert sorted(manifest_capabilities()) == sorted(WITHOUT)


@pytest.mark.parametrize("dropped", sorted(WITHOUT))
def test_without_each_capability(node, dropped):
    caps = [c for c in manifest_capabilities() if c != dropped]
    outcome, log, notes = outcome_without(node, caps)
    print(f"without {dropped}: {outcome}; events on the pod: {notes}")
    assert outcome == WITHOUT[dropped], log[-2000:]
    if dropped == "SYS_ADMIN":
        assert "Error: eBPF: cannot load" in log
    if dropped == "SYS_PTRACE":
        assert any("CAP_SYS_PTRACE" in (n or "") for n in notes), notes


def test_bpf_is_not_needed_beside_sys_admin(node):
    """CAP_BPF is left out of the manifest: with SYS_ADMIN it adds nothing."""
    outcome, log, _ = outcome_without(node, manifest_capabilities())
    assert outcome == "attaches", log[-2000:]


def test_without_host_pid(node):
    """hostPID: false gives the agent a PID namespace of its own (and, as in a container,
    a cgroup namespace): it still starts (it finds its own cgroup by the PID it sees),
    but the pods' cgroups list no process it can see, so no pod's network namespace is
    found: AttachFailed on every pod, "no process in <the pod's cgroup>"."""
    outcome, log, notes = outcome_without(
        node, manifest_capabilities(),
        wrap=("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--cgroup"))
    assert outcome == "AttachFailed", log[-2000:]
    assert any("no process in" in (n or "") for n in notes), notes


def test_a_read_only_cgroup_tree_is_enough(node):
    """The DaemonSet mounts the host's cgroup tree read-only: finding pods and attaching
    the hooks only reads it."""
    base = str(node.base)
    remount = (f"mount --bind {base} {base} && mount -o remount,bind,ro {base} && "
               f"! touch {base}/probe 2>/dev/null && exec \"$@\"")
    outcome, log, _ = outcome_without(
        node, manifest_capabilities(),
        wrap=("unshare", "--mount", "--propagation", "private", "sh", "-c", remount, "sh"))
    assert outcome == "attaches", log[-2000:]


def test_so_mark_needs_net_admin():
    """The agent marks its upstream sockets (gateway/src/upstream.rs, SO_MARK): the
    kernel refuses that without NET_ADMIN (or NET_RAW), SYS_ADMIN or not."""
    why = missing()
    if why:
        skip_or_fail(why)
    code = ("import socket\ns = socket.socket()\n"
            "try:\n    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 1); print('ok')\n"
            "except PermissionError:\n    print('EPERM')\n")
    def mark(caps):
        return subprocess.run(
            ["setpriv", "--inh-caps=-all", f"--bounding-set=-all,{caps}", "--no-new-privs",
             sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert mark("+sys_admin,+sys_ptrace") == "EPERM"
    assert mark("+sys_admin,+sys_ptrace,+net_admin") == "ok"


def test_the_agent_stops_on_sigterm(node):
    proc, admin, log = node.agent(manifest_capabilities(), "sigterm")
    until("ready", lambda: ready(admin), proc, log)
    node.api.patch_annotations("pod", NAMESPACE, "served", {"kube-gateway.io/ai": "true"})
    until("attached", lambda: "GatewayAttached" in reasons(node.api, "served"), proc, log)
    started = time.monotonic()
    stop(proc, timeout=30)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert time.monotonic() - started < 30
    assert "GatewayDetached" in reasons(node.api, "served")
