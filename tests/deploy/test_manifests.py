"""The install manifests as `kubectl kustomize` renders them: what the DaemonSet must
(and must not) have, the RBAC rules against the Kubernetes calls in the code, the
optional components. The typed parse of every object (k8s-openapi) is
watcher/tests/manifests.rs; the rules against the agent's real requests are
test_rbac.py."""

import re

from deploy_helpers import ROOT, cluster_role_rules, render

# Where the agent's Kubernetes calls are made (the node agent uses the watcher's client).
API_SOURCES = ["watcher/src/run.rs", "watcher/src/events.rs", "gateway/src/node/mod.rs"]


def by_kind(objects, kind):
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"one {kind}, found {len(found)}"
    return found[0]


def container(objects):
    pod = by_kind(objects, "DaemonSet")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod, pod["containers"][0]


def test_the_base_renders_the_node_agent_and_its_rbac():
    objects = render("deploy")
    assert [o["kind"] for o in objects] == [
        "Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service",
        "DaemonSet"]
    for o in objects:
        if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"]["namespace"] == "kube-gateway", o["kind"]
    binding = by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == by_kind(objects, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kube-gateway",
                                    "namespace": "kube-gateway"}]
    pod, _ = container(objects)
    assert pod["serviceAccountName"] == "kube-gateway"


def test_the_daemonset_has_the_privileges_the_agent_needs_and_no_more():
    pod, c = container(render("deploy"))
    assert pod["hostPID"] is True
    assert "hostNetwork" not in pod and "hostIPC" not in pod
    sc = c["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"],
                                  "add": ["SYS_ADMIN", "NET_ADMIN", "SYS_PTRACE"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes) == {"host-cgroup", "state"}
    assert volumes["host-cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert mounts["host-cgroup"]["readOnly"] is True
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/kube-gateway"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["HOST_CGROUP_ROOT"]["value"] == mounts["host-cgroup"]["mountPath"]
    for name in ("STORE", "SPOOL"):  # on the state volume: the root filesystem is read-only
        assert mounts["state"]["mountPath"] in env[name]["value"], name


def test_the_command_line_and_env_are_the_clis():
    """Every flag and variable the manifest sets is one `kube-gateway node` takes
    (gateway/src/cli.rs), and the probes hit the admin port it serves."""
    _, c = container(render("deploy"))
    cli = (ROOT / "gateway/src/cli.rs").read_text()
    assert c["args"][0] == "node"
    for arg in c["args"][1:]:
        flag = arg.split("=")[0]
        name = flag.removeprefix("--").replace("-", "_")
        assert re.search(rf"pub {name}: ", cli), f"{flag} is not a flag of kube-gateway"
    env_names = set(re.findall(r'pub const \w+: &str = "(\w+)";', cli))
    for e in c["env"]:
        if e["name"] != "RUST_LOG":  # read by tracing-subscriber's EnvFilter
            assert e["name"] in env_names, f"{e['name']} is read by nothing"
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"][1:])
    admin_port = int(args["admin"].rsplit(":", 1)[1])
    assert args["listen"].startswith("127.0.0.1:")  # each pod's listener, IPv4 (the CLI)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"admin": admin_port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    admin = (ROOT / "gateway/src/admin.rs").read_text()
    for path in ("/readyz", "/healthz", "/metrics"):
        assert f'"{path}"' in admin, f"the admin endpoint does not serve {path}"


def test_prometheus_finds_the_admin_port_by_annotation_and_service():
    objects = render("deploy")
    pod_meta = by_kind(objects, "DaemonSet")["spec"]["template"]["metadata"]
    _, c = container(objects)
    port = c["ports"][0]["containerPort"]
    assert pod_meta["annotations"] == {"prometheus.io/scrape": "true",
                                       "prometheus.io/port": str(port),
                                       "prometheus.io/path": "/metrics"}
    svc = by_kind(objects, "Service")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["ports"][0]["targetPort"] == "admin"
    labels = pod_meta["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())


def test_every_cluster_role_rule_is_a_call_in_the_code():
    """Static half: each (group, resource) granted is one the code builds an Api for,
    and the code's Api types are all granted. test_rbac.py checks the verbs against the
    agent's real requests."""
    rules = cluster_role_rules(render("deploy"))
    code = "\n".join((ROOT / p).read_text() for p in API_SOURCES)
    # The typed Api<K>s the code makes: K -> (group, resource).
    known = {"Pod": ("", "pods"), "ConfigMap": ("", "configmaps"),
             "Event": ("events.k8s.io", "events")}
    used = {known[a or b] for a, b in re.findall(r"Api::<(\w+)>|Api<(\w+)>", code)}
    assert "use k8s_openapi::api::events::v1::Event;" in code  # events.k8s.io, not core
    assert {(g, r) for g, r, _ in rules} == used


def test_the_servicemonitor_is_an_optional_component():
    base = render("deploy")
    assert all(o["apiVersion"] != "monitoring.coreos.com/v1" for o in base)
    objects = render("deploy/overlays/monitoring")
    sm = by_kind(objects, "ServiceMonitor")
    svc = by_kind(objects, "Service")
    assert sm["metadata"]["namespace"] == svc["metadata"]["namespace"] == "kube-gateway"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    # Everything else is the base, unchanged.
    assert [o for o in objects if o["kind"] != "ServiceMonitor"] == base


def test_the_postgres_component_takes_the_store_url_from_a_secret():
    _, c = container(render("deploy/overlays/postgres"))
    env = {e["name"]: e for e in c["env"]}
    assert env["STORE"] == {"name": "STORE", "valueFrom": {"secretKeyRef": {
        "name": "kube-gateway-store", "key": "url"}}}
    assert env["SPOOL"]["value"].startswith("/var/lib/kube-gateway/")
