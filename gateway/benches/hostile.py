"""Hostile answers for gateway/benches/hostile.sh: an upstream that sends what no sane
LLM would (one event of 64 MB, one "word" of 20 MB without usage), and the client side
that asks for them and times the records of ordinary requests behind them.

    python3 hostile.py upstream PORT
    python3 hostile.py get PORT PATH MODEL          one request, the body read and dropped
    python3 hostile.py behind PORT MODEL N LOGFILE  the one-word answer, then N ordinary
                                                    requests; prints how late their
                                                    access-log lines came
    python3 hostile.py idle PORT N SECONDS          N keep-alive connections, one request
                                                    each, then idle for SECONDS
    python3 hostile.py streams PORT N SECONDS       N live streams at once for SECONDS
"""

import socket

import datetime
import http.client
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WRITE = 64 * 1024


def chunk(text, usage=None):
    body = {"id": "h", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    if usage is not None:
        body = {"id": "h", "object": "chat.completion.chunk", "model": "m", "choices": [],
                "usage": usage}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def start(self, content_type):
        # No length: the body ends when the connection closes.
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        self.end_headers()

    def big(self, prefix, size, suffix):
        """One line of `size` bytes of text, written in pieces as a real server would."""
        self.wfile.write(prefix)
        left = size
        piece = b"x" * WRITE
        while left > 0:
            n = min(left, WRITE)
            self.wfile.write(piece[:n])
            left -= n
        self.wfile.write(suffix)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        model = body.get("model", "")
        kind, _, mb = model.partition("-")
        size = int(float(mb or "0") * 1024 * 1024)
        if kind == "sseline":
            self.start("text/event-stream")
            self.wfile.write(chunk("start "))
            self.big(b'data: {"choices":[{"index":0,"delta":{"content":"', size, b'"}}]}\n\n')
            self.wfile.write(chunk("", {"prompt_tokens": 3, "completion_tokens": 5,
                                        "total_tokens": 8}))
            self.wfile.write(b"data: [DONE]\n\n")
        elif kind == "ndjsonline":
            self.start("application/x-ndjson")
            self.big(b'{"model":"m","message":{"role":"assistant","content":"', size,
                     b'"},"done":false}\n')
            self.wfile.write(b'{"model":"m","message":{"role":"assistant","content":""},'
                             b'"done":true,"prompt_eval_count":3,"eval_count":5}\n')
        elif kind == "slow":
            # A live stream: a small event every 0.5 s for `mb` seconds.
            self.start("text/event-stream")
            for _ in range(int(float(mb) * 2)):
                self.wfile.write(chunk("tick "))
                self.wfile.flush()
                time.sleep(0.5)
            self.wfile.write(b"data: [DONE]\n\n")
        elif kind == "oneword":
            # One unbroken run of letters, 16 KiB an event, and no usage at all.
            self.start("text/event-stream")
            event = chunk("y" * 16384)
            for _ in range(size // 16384):
                self.wfile.write(event)
            self.wfile.write(b"data: [DONE]\n\n")
        else:
            answer = json.dumps({
                "id": "o", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)


def request(port, path, model, stream):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    payload = {"model": model, "stream": stream,
               "messages": [{"role": "user", "content": "say something"}]}
    conn.request("POST", path, json.dumps(payload), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    n = 0
    while True:
        data = resp.read(WRITE)
        if not data:
            break
        n += len(data)
    conn.close()
    return resp.status, n


def log_times(logfile, model):
    """Access-log timestamps of the requests for `model`, in order."""
    times = []
    with open(logfile) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("target") == "access" and rec.get("requested_model") == model:
                ts = datetime.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
                times.append(ts.timestamp())
    return times


def behind(port, model, n, logfile):
    status, size = request(port, "/v1/chat/completions", model, True)
    ends = []
    for _ in range(n):
        request(port, "/v1/chat/completions", "ordinary", False)
        ends.append(time.time())
    deadline = time.time() + 60
    while time.time() < deadline:
        logged = log_times(logfile, "ordinary")
        if len(logged) >= n:
            break
        time.sleep(0.2)
    late = sorted((t - e) * 1000 for t, e in zip(logged, ends))
    print(f"one-word answer: status {status}, {size} bytes; {len(logged)}/{n} ordinary "
          f"records logged; delay after the client's end: median {late[len(late) // 2]:.1f} ms, "
          f"max {late[-1]:.1f} ms")


def idle(port, n, seconds):
    body = json.dumps({"model": "ordinary", "messages": [{"role": "user", "content": "hi"}]})
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(65536)
        length = int(got.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        while len(got.split(b"\r\n\r\n", 1)[1]) < length:
            got += s.recv(65536)
        conns.append(s)
    time.sleep(seconds)
    for s in conns:
        s.close()


def streams(port, n, seconds):
    """`n` live streams at once, each read as it flows."""
    import threading
    def one():
        request(port, "/v1/chat/completions", f"slow-{seconds}", True)
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Server(ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True


def main():
    cmd = sys.argv[1]
    if cmd == "upstream":
        Server(("127.0.0.1", int(sys.argv[2])), Upstream).serve_forever()
    elif cmd == "get":
        status, size = request(int(sys.argv[2]), sys.argv[3], sys.argv[4], True)
        print(f"{sys.argv[4]}: status {status}, {size} bytes to the client")
    elif cmd == "streams":
        streams(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif cmd == "idle":
        idle(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif cmd == "behind":
        behind(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])


if __name__ == "__main__":
    main()
