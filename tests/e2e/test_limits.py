"""The gateway's limits, tried as a hostile client would, over real sockets against the
built binaries: slow headers and idle keep-alive connections end at --header-timeout-ms,
a trickled body gets 408 in the caller's format, an oversized head 431, connections past
--max-connections are closed at once and counted, and malformed framing is refused
(hyper's bare 400: it answers before any request reaches the gateway's code)."""

import json
import socket
import subprocess
import time
import urllib.request

import pytest

from conftest import binary, free_port, start

HEADER_MS = 1500
BODY_MS = 1500
MAX_CONNS = 20


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    logs = tmp_path_factory.mktemp("limits")
    demo_port, gw_port, admin_port = free_port(), free_port(), free_port()
    demo = start([binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
                 demo_port, "demo server", logs / "demo.log")
    gw = start(
        [binary("kube-gateway"), "run", "--listen", f"127.0.0.1:{gw_port}",
         "--upstream", f"127.0.0.1:{demo_port}", "--admin", f"127.0.0.1:{admin_port}",
         "--store", "none", "--threads", "2",
         "--header-timeout-ms", str(HEADER_MS), "--body-timeout-ms", str(BODY_MS),
         "--max-header-bytes", "8192", "--max-connections", str(MAX_CONNS)],
        gw_port, "gateway", logs / "gateway.log",
    )
    yield gw_port, admin_port
    for p in (gw, demo):
        p.terminate()
        p.wait(timeout=15)


def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_within(s, seconds):
    """Seconds until the peer closed `s` (reading and dropping what it sent), or None."""
    start = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(4096):
            pass
    except socket.timeout:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def response(s):
    data = b""
    s.settimeout(10)
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(4096)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest


CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


def test_slow_headers_end_at_the_header_timeout(gateway):
    port, _ = gateway
    s = connect(port)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    # One more header line now and then, never the blank line (slowloris).
    start = time.monotonic()
    for _ in range(3):
        time.sleep(0.3)
        s.sendall(b"X-Slow: 1\r\n")
    waited = closed_within(s, 10)
    assert waited is not None, "the connection was still open after 10 s"
    total = time.monotonic() - start
    assert HEADER_MS / 1000 - 0.2 < total < HEADER_MS / 1000 + 2.0, total


def test_an_idle_keep_alive_connection_ends_at_the_header_timeout(gateway):
    port, _ = gateway
    s = connect(port)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(CHAT) + CHAT)
    status, _, _ = response(s)
    assert status == 200
    start = time.monotonic()
    waited = closed_within(s, 10)
    assert waited is not None
    assert HEADER_MS / 1000 - 0.2 < time.monotonic() - start < HEADER_MS / 1000 + 2.0


def test_a_trickled_body_gets_408_in_the_callers_format(gateway):
    port, _ = gateway
    for path, dialect in (("/v1/chat/completions", "openai"), ("/api/chat", "ollama")):
        s = connect(port)
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT[:5])
        status, headers, body = response(s)
        assert status == 408
        assert headers["x-kube-gateway-error"] == "request_body_timeout"
        err = json.loads(body)
        if dialect == "openai":
            assert "did not arrive" in err["error"]["message"]
        else:
            assert "did not arrive" in err["error"]
        s.close()


def test_an_oversized_head_gets_431(gateway):
    port, _ = gateway
    s = connect(port)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    status, _, _ = response(s)
    assert status == 431


def test_connections_past_the_limit_are_closed_at_once_and_counted(gateway):
    port, admin = gateway
    held = [connect(port) for _ in range(MAX_CONNS)]
    # Each held connection sends a byte of a request head, so it is past the sniffing
    # and counted as open (the accept loop counts it at once anyway).
    for s in held:
        s.sendall(b"P")
    time.sleep(0.3)
    extra = connect(port)
    waited = closed_within(extra, 5)
    assert waited is not None and waited < 1.0, waited
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    refused = [l for l in metrics.splitlines() if l.startswith("kube_gateway_connections_refused_total")]
    assert refused and float(refused[0].split()[-1]) >= 1, refused
    open_now = [l for l in metrics.splitlines() if l.startswith("kube_gateway_connections_open")]
    assert open_now and float(open_now[0].split()[-1]) >= MAX_CONNS, open_now
    for s in held:
        s.close()
    # Their slots come back: a new connection is served.
    deadline = time.monotonic() + 5
    while True:
        s = connect(port)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(CHAT) + CHAT)
        try:
            status, _, _ = response(s)
            assert status == 200
            break
        except (IndexError, ConnectionResetError):
            assert time.monotonic() < deadline, "slots did not come back"
            time.sleep(0.2)


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
])
def test_malformed_framing_is_refused_before_any_upstream(gateway, framing):
    port, _ = gateway
    s = connect(port)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\nhello")
    status, _, _ = response(s)
    assert status == 400
