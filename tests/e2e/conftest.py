"""Fixtures for the end-to-end tests: the real demo LLM server and the real gateway,
run as the built binaries on loopback ports."""

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
PROFILE = os.environ.get("KGW_PROFILE", "debug")
REWRITTEN = "rewritten-model"


def binary(name: str) -> str:
    path = TARGET_DIR / PROFILE / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: run `cargo build` first")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


def start(args: list, port: int, what: str, log: Path) -> subprocess.Popen:
    out = open(log, "wb")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    wait_listening(port, proc, what)
    return proc


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """(direct URL of the demo LLM, URL of the gateway in front of it, gateway log path)."""
    logs = tmp_path_factory.mktemp("logs")
    demo_port, gw_port = free_port(), free_port()
    demo = start(
        [binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
        demo_port, "demo server", logs / "demo.log",
    )
    gw_log = logs / "gateway.log"
    gw = start(
        [binary("kube-gateway"), "--log-format", "json", "run",
         "--listen", f"127.0.0.1:{gw_port}", "--upstream", f"127.0.0.1:{demo_port}",
         "--model", REWRITTEN, "--store", f"sqlite://{logs}/usage.db",
         "--spool", str(logs / "usage.spool")],
        gw_port, "gateway", gw_log,
    )
    yield f"http://127.0.0.1:{demo_port}", f"http://127.0.0.1:{gw_port}", gw_log
    for p in (gw, demo):
        p.terminate()
        p.wait(timeout=15)
