"""The node agent's idle memory per attached pod (issue 18: at most 256 KiB a pod), on a
simulated node: tests/e2e/test_node.py's `Node` (pods as network namespaces plus
kubelet-like cgroups with a process in both, an LLM host namespace running the demo LLM,
the fake Kubernetes API server, a real `kube-gateway node`), with N pods instead of two.

Steps: N pods, none annotated, the agent started, 10 s of quiet; all N annotated
(`kube-gateway.io/ai=true`), until /metrics says kube_gateway_attached_pods == N, 15 s
(the agent gives freed memory back every 5 s); one request from inside the first pod,
15 s (the process's first answer builds its tokenizer, once for all pods); one from
inside each other pod, 15 s.
At each step: VmRSS, RssAnon, RssFile, threads and open fds of the agent (/proc), and its
resident memory from /proc/PID/smaps by kind (thread stacks, other anonymous memory,
[heap], files). Run by pods.sh (as root); everything it made is removed on exit,
Ctrl-C and SIGTERM included.

Knobs (environment): PODS=20, SETTLE_IDLE=10, SETTLE=15, KGW_BIN and KGW_DEMO_BIN (the
binaries), KGW_TAG (the prefix of the namespaces, links and cgroup directory),
PODS_OUT (a directory to keep the agent's log and the smaps of each step in)."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests" / "k8s"))
import test_node as tn  # noqa: E402  (the simulated node, reused as it is)

N = int(os.environ.get("PODS", "20"))
SETTLE_IDLE = float(os.environ.get("SETTLE_IDLE", "10"))
SETTLE = float(os.environ.get("SETTLE", "15"))
BINS = {"kube-gateway": os.environ.get("KGW_BIN"), "ai-demo": os.environ.get("KGW_DEMO_BIN")}


def configure():
    """test_node's module globals, for N pods: its Node reads them when it runs."""
    if not 2 <= N <= 250:
        sys.exit("PODS must be 2..250 (one /24 a pod, 10.78.<i>.0)")
    tn.TAG = os.environ.get("KGW_TAG") or f"kgwp{os.getpid() % 100000}"
    tn.PODS.clear()
    for i in range(1, N + 1):
        tn.PODS[f"chat-{i:03d}"] = (str(uuid.uuid4()), f"10.78.{i}.2", f"10.78.{i}.1")
    real = tn.binary
    tn.binary = lambda name: BINS.get(name) or real(name)


# ---- measuring ----

def status(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


KINDS = ["thread stacks", "mimalloc", "glibc arenas", "anon, other", "[heap]", "[stack] (main)",
         "files", "other"]
# mimalloc reserves its arenas from 2 TiB up (its hint address); glibc's per-thread malloc
# arenas (C code's malloc: SQLite, libc itself) are 64 MiB-aligned. Heuristics, for a
# rough split: the smaps of each step are kept (PODS_OUT) for a closer look.
MIMALLOC_LOW, MIMALLOC_HIGH = 2 << 40, 64 << 40
GLIBC_ARENA_ALIGN = 64 << 20


def smaps_by_kind(pid, keep=None):
    """Resident KiB by kind. A thread's stack is the read-write anonymous mapping right
    above a 4 KiB no-access guard (glibc's layout for pthread stacks; Rust's signal stack
    for each thread, the stack-overflow handler's, has one too and is counted with them,
    so there are about two such mappings a thread)."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    if keep:
        keep.write_text(text)
    maps, cur = [], None
    for line in text.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$", line)
        if head:
            cur = {"start": int(head[1], 16), "end": int(head[2], 16), "perms": head[3],
                   "name": head[4], "Rss": 0}
            maps.append(cur)
        elif line.startswith("Rss:"):
            cur["Rss"] = int(line.split()[1])
    kinds = {k: 0 for k in KINDS}
    stacks = 0
    for i, m in enumerate(maps):
        name = m["name"]
        if name.startswith("/"):
            kinds["files"] += m["Rss"]
        elif name == "[heap]":
            kinds["[heap]"] += m["Rss"]
        elif name == "[stack]":
            kinds["[stack] (main)"] += m["Rss"]
        elif name == "":
            prev = maps[i - 1] if i else None
            if (prev and prev["name"] == "" and prev["perms"].startswith("---")
                    and prev["end"] == m["start"] and prev["end"] - prev["start"] == 4096
                    and m["perms"].startswith("rw")):
                kinds["thread stacks"] += m["Rss"]
                stacks += 1
            elif MIMALLOC_LOW <= m["start"] < MIMALLOC_HIGH:
                kinds["mimalloc"] += m["Rss"]
            elif m["start"] % GLIBC_ARENA_ALIGN == 0:
                kinds["glibc arenas"] += m["Rss"]
            else:
                kinds["anon, other"] += m["Rss"]
        else:
            kinds["other"] += m["Rss"]
    kinds["stack mappings"] = stacks
    return kinds


def metric(admin, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M)
    return sum(float(v) for v in values) if values else None


def request(node, pod):
    """One non-streaming Ollama chat from inside `pod` (its netns and its cgroup: the
    capture hooks sit on the pod's cgroup) to the LLM's address, as the workload knows
    it. Returns the model the answer names."""
    _, _, llm_ip = tn.PODS[pod]
    body = json.dumps({"model": tn.ASKED, "messages": [{"role": "user", "content": "hi"}],
                       "stream": False, "options": {"num_predict": 5}})
    out = subprocess.run(
        ["bash", "-c", f'echo $$ > {node.cgroups[pod]}/cgroup.procs; exec "$@"', "client",
         "nsenter", f"--net=/run/netns/{node.ns(pod)}", "curl", "-sS", "--max-time", "20",
         "-H", "content-type: application/json", "-d", body,
         f"http://{llm_ip}:11434/api/chat"],
        capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"request from {pod} failed: {out.stderr}")
    return json.loads(out.stdout).get("model")


# ---- the run ----

def main():
    configure()
    keep = os.environ.get("PODS_OUT")
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="kgw-pods-"))
    tmp.mkdir(parents=True, exist_ok=True)
    node = tn.Node(tmp)
    steps = []

    def measure(label):
        if node.agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({node.agent.returncode}):\n"
                               f"{node.agent_log.read_text()[-3000:]}")
        pid = node.agent.pid
        s = status(pid)
        s.update(smaps_by_kind(pid, tmp / f"smaps-{len(steps)}.txt"))
        s["label"] = label
        steps.append(s)
        print(f"  {label}: VmRSS {s['VmRSS']} KiB, RssAnon {s['RssAnon']} KiB, "
              f"threads {s['Threads']}, fds {s['fds']}", flush=True)

    try:
        print(f"pods: {N} pods on a simulated node (tag {tn.TAG}), agent {tn.binary('kube-gateway')}",
              flush=True)
        node.setup()
        node.start_agent()
        print(f"  the agent is ready (pid {node.agent.pid}); {SETTLE_IDLE:g} s of quiet", flush=True)
        time.sleep(SETTLE_IDLE)
        measure("0 attached, idle")

        t0 = time.monotonic()
        for pod in tn.PODS:
            node.api.patch_annotations("pod", tn.NAMESPACE, pod, {"kube-gateway.io/ai": "true"})
        tn.until(f"{N} pods attached", lambda: metric(node.admin, "kube_gateway_attached_pods") == N,
                 timeout=60 + N)
        print(f"  {N} attached in {time.monotonic() - t0:.1f} s; {SETTLE:g} s of quiet", flush=True)
        time.sleep(SETTLE)
        measure(f"{N} attached, idle")

        before = metric(node.admin, "kube_gateway_requests_total") or 0

        def serve(pods, total):
            for pod in pods:
                model = request(node, pod)
                if model != tn.ASKED:
                    raise RuntimeError(f"{pod}: the answer names {model!r}")
            tn.until("the requests counted",
                     lambda: (metric(node.admin, "kube_gateway_requests_total") or 0)
                     - before >= total)

        # The process's first answer builds what it builds once for every pod (the
        # tokenizer its calibration counts answers with): measured apart, so that the
        # figure per pod is what each further pod costs.
        pods = list(tn.PODS)
        serve(pods[:1], 1)
        print(f"  one request from {pods[0]}; {SETTLE:g} s of quiet", flush=True)
        time.sleep(SETTLE)
        measure(f"{N} attached, 1 served")
        serve(pods[1:], N)
        served = {json.loads(line).get("pod") for line in node.agent_log.read_text().splitlines()
                  if '"message":"request"' in line}
        if served != set(tn.PODS):
            raise RuntimeError(f"the agent served {len(served)} of the {N} pods")
        print(f"  one request from each pod, all through the agent; {SETTLE:g} s of quiet", flush=True)
        time.sleep(SETTLE)
        measure(f"{N} attached, after 1 request each")
        report(steps)
        (tmp / "steps.json").write_text(json.dumps(steps, indent=1))
    finally:
        teardown(node)
        if keep:
            print(f"kept in {tmp}: agent.log, smaps-<step>.txt, steps.json")
        else:
            subprocess.run(["rm", "-rf", str(tmp)])


def teardown(node):
    """Node.teardown, then whatever it could not reach (a run stopped half-way)."""
    try:
        node.teardown()
    except Exception as e:  # noqa: BLE001  (the sweep below finishes the job)
        print(f"teardown: {e!r}; sweeping", file=sys.stderr)
    sweep(tn.TAG)


def sweep(tag):
    """Removes the namespaces named <tag>-* and the cgroup directory <root>/<tag> (its
    processes killed first). Idempotent; pods.sh runs it too, on its way out."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in names.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(f"{tag}-"):
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                      text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    base = tn.cgroup_v2_root() / tag
    if not base.is_dir():
        return
    dirs = sorted((d for d in base.rglob("*") if d.is_dir()), key=lambda d: len(d.parts),
                  reverse=True) + [base]
    for d in dirs:
        for pid in (d / "cgroup.procs").read_text().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for d in dirs:
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)  # the killed processes are leaving


def report(steps):
    base = steps[0]
    print()
    print(f"{'step':<36} {'VmRSS KiB':>10} {'RssAnon':>8} {'RssFile':>8} {'threads':>7} {'fds':>5}"
          f" {'per pod: VmRSS':>15} {'RssAnon':>8}")
    for s in steps:
        per = "-" if s is base else f"{(s['VmRSS'] - base['VmRSS']) / N:.1f}"
        anon = "-" if s is base else f"{(s['RssAnon'] - base['RssAnon']) / N:.1f}"
        print(f"{s['label']:<36} {s['VmRSS']:>10} {s['RssAnon']:>8} {s['RssFile']:>8} "
              f"{s['Threads']:>7} {s['fds']:>5} {per:>15} {anon:>8}")
    kinds = KINDS
    print()
    print("resident KiB by kind (/proc/PID/smaps), and per pod over the first step:")
    print(f"{'step':<36} " + " ".join(f"{k[:13]:>13}" for k in kinds) + f" {'stacks':>6}")
    for s in steps:
        print(f"{s['label']:<36} " + " ".join(f"{s[k]:>13}" for k in kinds)
              + f" {s['stack mappings']:>6}")
        if s is not base:
            print(f"{'  per pod':<36} "
                  + " ".join(f"{(s[k] - base[k]) / N:>13.1f}" for k in kinds))
    attached, first, last = steps[1], steps[2], steps[3]
    once = first["VmRSS"] - attached["VmRSS"]
    per = (attached["VmRSS"] - base["VmRSS"]) / N + (last["VmRSS"] - first["VmRSS"]) / (N - 1)
    print()
    print(f"the first request, once for the process (the tokenizer, pooled connections): "
          f"{once} KiB")
    print(f"per attached pod after a request each (attached, over the idle step; served, over "
          f"the first pod's request): {per:.1f} KiB "
          f"(issue 18's goal: at most 256 KiB) -> {'met' if per <= 256 else 'NOT met'}")


def on_term(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:  # pods.sh's fallback: pods.py sweep TAG
        sweep(sys.argv[2])
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}); cleaned up", file=sys.stderr)
        sys.exit(130)
