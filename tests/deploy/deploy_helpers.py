"""Shared by the deploy tests (not a conftest.py: tests/e2e has one, and the test files
import their helpers by module name): rendering the kustomize directories with kubectl."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI") == "true"


def skip_or_fail(reason):
    """Skip here; fail under CI=true, where every check must run."""
    if IN_CI:
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


def render(directory="deploy"):
    """The objects `kubectl kustomize DIR` renders (DIR relative to the repository)."""
    if shutil.which("kubectl") is None:
        skip_or_fail("needs kubectl (Debian kubernetes-client) for `kubectl kustomize`")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / directory)],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def cluster_role_rules(objects):
    """The ClusterRole's rules as a set of (apiGroup, resource, verb)."""
    roles = [o for o in objects if o["kind"] == "ClusterRole"]
    assert len(roles) == 1, "one ClusterRole"
    return {(g, r, v) for rule in roles[0]["rules"]
            for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
