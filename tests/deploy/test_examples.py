"""ai-demo/k8s, the Kubernetes walkthrough's objects: they render, each policy ConfigMap
holds a policy `kube-gateway policy check` accepts, the selector picks the chat pods,
and the client is the official Python ollama client pointed at the Ollama Service. The
typed parse of every object is watcher/tests/manifests.rs. Nothing here runs a cluster
(no kind here): that the walkthrough works end to end on kind is not checked."""

import os
import subprocess
from pathlib import Path

import yaml

from deploy_helpers import ROOT, render, skip_or_fail


def kube_gateway():
    path = os.environ.get("KGW_BINARY") or str(
        Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
        / os.environ.get("KGW_PROFILE", "debug") / "kube-gateway")
    if not Path(path).exists():
        skip_or_fail(f"needs the kube-gateway binary ({path}): cargo build, or set KGW_BINARY")
    return path


def policies(objects):
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"
            and (o["metadata"].get("labels") or {}).get("kube-gateway.io/policy") == "true"}


def test_every_example_policy_passes_policy_check(tmp_path):
    found = policies(render("ai-demo/k8s"))
    assert set(found) == {"namespace-defaults", "chat-policy"}
    for name, cm in found.items():
        f = tmp_path / f"{name}.yaml"
        f.write_text(cm["data"]["policy.yaml"])
        out = subprocess.run([kube_gateway(), "policy", "check", str(f)],
                             capture_output=True, text=True)
        assert out.returncode == 0, f"{name}: {out.stdout}{out.stderr}"


def test_the_selector_policy_picks_the_chat_pods_and_rewrites_to_a_pulled_model():
    objects = render("ai-demo/k8s")
    chat = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "chat")
    labels = chat["spec"]["template"]["metadata"]["labels"]
    selector = policies(objects)["chat-policy"]["metadata"]["annotations"]["kube-gateway.io/selector"]
    key, value = selector.split("=")
    assert labels[key] == value
    # Not annotated: the walkthrough annotates the running pod.
    assert "kube-gateway.io/ai" not in (chat["spec"]["template"]["metadata"].get("annotations") or {})
    policy = yaml.safe_load(policies(objects)["chat-policy"]["data"]["policy.yaml"])
    target = policy["models"]["rewrite"][0]["to"]
    ollama = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "ollama")
    pull = ollama["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"][-1]
    assert f"ollama pull {target}" in pull


def test_the_client_is_the_official_ollama_client_at_the_service():
    objects = render("ai-demo/k8s")
    script = next(o for o in objects if o["kind"] == "ConfigMap"
                  and o["metadata"]["name"] == "chat-script")["data"]["chat.py"]
    compile(script, "chat.py", "exec")
    assert "import ollama" in script and "ollama.Client(host=host)" in script
    svc = next(o for o in objects if o["kind"] == "Service")
    assert "http://ollama:11434" in script
    assert (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]) == ("ollama", 11434)


def test_the_kind_config_is_a_kind_cluster():
    cfg = yaml.safe_load((ROOT / "ai-demo/k8s/kind.yaml").read_text())
    assert cfg["kind"] == "Cluster" and cfg["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker"]
