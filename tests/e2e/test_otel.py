"""OpenTelemetry export through the real binaries: with OTEL_EXPORTER_OTLP_ENDPOINT set,
the gateway sends over OTLP/HTTP (decoded here with the official OpenTelemetry protobuf
definitions) one span per LLM request with the GenAI attributes and a guardrail event for
each rule that acted, and its metrics, whose values are the ones its Prometheus endpoint
shows; no prompt text in either."""

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ollama
import openai
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest, ExportMetricsServiceResponse)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

from conftest import binary, free_port, start, wait_listening


class Receiver(BaseHTTPRequestHandler):
    spans, raw, metrics = [], [], []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.raw.append(body)
        if self.path == "/v1/metrics":
            req = ExportMetricsServiceRequest()
            req.ParseFromString(body)
            Receiver.metrics.append(req)
            out = ExportMetricsServiceResponse().SerializeToString()
        else:
            assert self.path == "/v1/traces", self.path
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                resource = {a.key: a.value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        Receiver.spans.append((resource, span))
            out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


def attrs(span):
    def value(v):
        kind = v.WhichOneof("value")
        if kind == "array_value":
            return [value(x) for x in v.array_value.values]
        return getattr(v, kind)
    return {a.key: value(a.value) for a in span.attributes}


def start_gateway(tmp_path, otlp_port, args, **env):
    """The demo LLM, and a gateway in front of it exporting to `otlp_port`, with the policy
    in tmp_path/policy.yaml and `args` added. Returns both processes and the gateway's port."""
    demo_port, gw_port = free_port(), free_port()
    demo = start([binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
                 demo_port, "demo", tmp_path / "demo.log")
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
               OTEL_BSP_SCHEDULE_DELAY="200", **env)
    gw = subprocess.Popen([binary("kube-gateway"), "run", "--listen", f"127.0.0.1:{gw_port}",
                           "--upstream", f"127.0.0.1:{demo_port}",
                           "--policy", str(tmp_path / "policy.yaml"),
                           "--pod-namespace", "team-a", "--pod-name", "app-1", *args],
                          env=env, stdout=open(tmp_path / "gw.log", "wb"), stderr=subprocess.STDOUT)
    return demo, gw, gw_port


def serve_otlp(port, handler):
    """An OTLP/HTTP receiver on `port`, answering with `handler`, in a thread."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop(gw, demo, server):
    """SIGTERM to the gateway (it must exit cleanly, flushing its exports), then the rest."""
    gw.send_signal(signal.SIGTERM)
    assert gw.wait(timeout=30) == 0
    demo.terminate()
    demo.wait(timeout=15)
    server.shutdown()


def test_one_span_per_request_with_the_genai_attributes(tmp_path):
    otlp_port = free_port()
    Receiver.spans, Receiver.raw, Receiver.metrics = [], [], []
    server = serve_otlp(otlp_port, Receiver)
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: kube-gateway.io/v1alpha1\n"
        "models:\n  rewrite:\n    - { from: llama3.2:1b, to: gemma2:2b }\n"
        "promptRules:\n  - { name: emails, match: { detector: email }, action: redact }\n")
    demo, gw, gw_port = start_gateway(tmp_path, otlp_port, ["--store", "none"])
    marker = f"secret-{uuid.uuid4().hex}"
    try:
        wait_listening(gw_port, gw, "gateway")
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="x", max_retries=0)
        # The wall clock around each request: its span must lie inside.
        windows, answers = [], []
        for i in range(3):
            before = time.time_ns()
            answers.append(oa.chat.completions.create(model="llama3.2:1b", messages=[
                {"role": "user", "content": f"{marker} {i}"}]))
            windows.append((before, time.time_ns()))
        before = time.time_ns()
        chat = ollama.Client(host=f"http://127.0.0.1:{gw_port}").chat(
            model="llama3.2:1b", messages=[{"role": "user", "content": "mail ops@example.com"}])
        windows.append((before, time.time_ns()))
    finally:
        stop(gw, demo, server)
    spans = Receiver.spans
    assert len(spans) == 4, [s.name for _, s in spans]
    resource, first = spans[0]
    assert resource["service.name"].string_value == "kube-gateway"
    assert resource["k8s.pod.name"].string_value == "app-1"
    a = attrs(first)
    assert first.name == "chat gemma2:2b"
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gemma2:2b"
    assert a["kube_gateway.requested_model"] == "llama3.2:1b"
    assert a["gen_ai.usage.input_tokens"] == answers[0].usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == answers[0].usage.completion_tokens
    assert a["gen_ai.response.finish_reasons"] == [answers[0].choices[0].finish_reason]
    assert first.end_time_unix_nano > first.start_time_unix_nano
    for (_, span), (before, after) in zip(spans, windows):
        assert before <= span.start_time_unix_nano < span.end_time_unix_nano <= after, \
            f"span [{span.start_time_unix_nano}, {span.end_time_unix_nano}] outside the request [{before}, {after}]"
        for e in span.events:
            assert span.start_time_unix_nano <= e.time_unix_nano <= span.end_time_unix_nano
    assert first.kind == first.SPAN_KIND_CLIENT and not first.parent_span_id
    assert {(len(s.trace_id), len(s.span_id)) for _, s in spans} == {(16, 8)}
    assert len({s.trace_id for _, s in spans}) == 4, "a trace of its own per request"
    last = attrs(spans[3][1])
    assert last["gen_ai.provider.name"] == "ollama"
    assert last["gen_ai.usage.output_tokens"] == chat.eval_count
    events = [(e.name, {x.key: x.value.string_value for x in e.attributes}) for e in spans[3][1].events]
    assert events == [("gen_ai.guardrail.rule", {"gen_ai.guardrail.rule.name": "emails",
                                                  "gen_ai.guardrail.action": "redacted"})]
    payload = b"".join(Receiver.raw)
    assert marker.encode() not in payload and b"example.com" not in payload, "no prompt text"


def prom_samples(text):
    """The samples of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        assert m, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def prom_sum(samples, name, **match):
    return sum(v for n, labels, v in samples
               if n == name and all(labels.get(k) == want for k, want in match.items()))


def otlp_points(export, name):
    """The data points of one metric in an export, with their attributes as a dict."""
    out = []
    for rm in export.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name != name:
                    continue
                kind = metric.WhichOneof("data")
                for p in getattr(metric, kind).data_points:
                    out.append((metric, {a.key: attr_value(a.value) for a in p.attributes}, p))
    return out


def attr_value(v):
    return getattr(v, v.WhichOneof("value"))


def test_metrics_go_over_otlp_with_the_prometheus_values(tmp_path):
    otlp_port = free_port()
    Receiver.spans, Receiver.raw, Receiver.metrics = [], [], []
    server = serve_otlp(otlp_port, Receiver)
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: kube-gateway.io/v1alpha1\n"
        "models:\n  rewrite:\n    - { from: llama3.2:1b, to: gemma2:2b }\n"
        "promptRules:\n  - { name: emails, match: { detector: email }, action: redact }\n"
        "budgets:\n  - { name: team-daily, scope: namespace, window: day, limits: { totalTokens: 1000000 } }\n")
    admin_port = free_port()
    demo, gw, gw_port = start_gateway(
        tmp_path, otlp_port,
        ["--store", f"sqlite://{tmp_path / 'usage.db'}", "--spool", str(tmp_path / "spool"),
         "--admin", f"127.0.0.1:{admin_port}"],
        OTEL_METRIC_EXPORT_INTERVAL="300")
    marker = f"secret-{uuid.uuid4().hex}"
    try:
        wait_listening(gw_port, gw, "gateway")
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="x", max_retries=0)
        answers = [oa.chat.completions.create(model="llama3.2:1b", messages=[
            {"role": "user", "content": f"{marker} {i}"}]) for i in range(3)]
        streamed = list(oa.chat.completions.create(
            model="qwen2.5:0.5b", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": f"{marker} stream"}]))
        chat = ollama.Client(host=f"http://127.0.0.1:{gw_port}").chat(
            model="llama3.2:1b", messages=[{"role": "user", "content": "mail ops@example.com"}])
        # The recorder drains on a tick; then both views hold all five requests.
        deadline = time.time() + 10
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
                prom = prom_samples(r.read().decode())
            if prom_sum(prom, "kube_gateway_requests_total") == 5 or time.time() > deadline:
                break
            time.sleep(0.1)
        # Exports are periodic: one comes with every request in it while the gateway runs.
        while time.time() < deadline and not any(
                sum(p.as_int for _, _, p in otlp_points(e, "kube_gateway.requests")) == 5
                for e in list(Receiver.metrics)):
            time.sleep(0.1)
        periodic = len(Receiver.metrics)
    finally:
        stop(gw, demo, server)
    assert prom_sum(prom, "kube_gateway_requests_total") == 5
    assert periodic >= 1, "a periodic export before the stop"
    assert len(Receiver.metrics) > periodic, "and the last values at shutdown"
    last = Receiver.metrics[-1]
    resource = {a.key: attr_value(a.value) for a in last.resource_metrics[0].resource.attributes}
    assert resource["k8s.namespace.name"] == "team-a" and resource["k8s.pod.name"] == "app-1"

    # Token usage: the same sums and counts as Prometheus, which are the providers' counts.
    tokens = otlp_points(last, "gen_ai.client.token.usage")
    assert tokens and tokens[0][0].unit == "{token}"
    for kind, client_total in (
            ("input", sum(a.usage.prompt_tokens for a in answers)
             + streamed[-1].usage.prompt_tokens + chat.prompt_eval_count),
            ("output", sum(a.usage.completion_tokens for a in answers)
             + streamed[-1].usage.completion_tokens + chat.eval_count)):
        points = [p for _, attrs, p in tokens if attrs["gen_ai.token.type"] == kind]
        assert sum(p.sum for p in points) == client_total
        assert sum(p.sum for p in points) == prom_sum(
            prom, "gen_ai_client_token_usage_sum", gen_ai_token_type=kind)
        assert sum(p.count for p in points) == 5 == prom_sum(
            prom, "gen_ai_client_token_usage_count", gen_ai_token_type=kind)
    def counted(model):
        return sum(p.count for _, a, p in tokens
                   if a["gen_ai.request.model"] == model and a["gen_ai.token.type"] == "input")
    assert counted("gemma2:2b") == 4 and counted("qwen2.5:0.5b") == 1
    assert {a["gen_ai.provider.name"] for _, a, _ in tokens} == {"openai", "ollama"}

    duration = otlp_points(last, "gen_ai.client.operation.duration")
    assert duration[0][0].unit == "s"
    assert sum(p.count for _, _, p in duration) == 5
    assert abs(sum(p.sum for _, _, p in duration)
               - prom_sum(prom, "gen_ai_client_operation_duration_seconds_sum")) < 1e-6
    ttft = otlp_points(last, "gen_ai.server.time_to_first_token")
    assert sum(p.count for _, _, p in ttft) == prom_sum(
        prom, "gen_ai_server_time_to_first_token_seconds_count") == 5

    requests = {a["outcome"]: p.as_int for _, a, p in otlp_points(last, "kube_gateway.requests")
                if a["gen_ai.request.model"] == "llama3.2:1b"}
    assert requests == {"allowed": 3, "redacted": 1}
    assert requests["redacted"] == prom_sum(prom, "kube_gateway_requests_total", outcome="redacted")
    hits = {a["rule"]: p.as_int for _, a, p in otlp_points(last, "kube_gateway.rule_hits")}
    assert hits == {"emails": 1}
    rewrites = {(a["from"], a["to"]): p.as_int
                for _, a, p in otlp_points(last, "kube_gateway.model_rewrites")}
    assert rewrites == {("llama3.2:1b", "gemma2:2b"): 4}

    # Gauges are read at each export: the budget's use is what the requests spent.
    used = {a["measure"]: p.as_int for _, a, p in otlp_points(last, "kube_gateway.budget_used")
            if a["budget"] == "team-daily"}
    limit = {a["measure"]: p.as_int for _, a, p in otlp_points(last, "kube_gateway.budget_limit")
             if a["budget"] == "team-daily"}
    assert limit == {"total_tokens": 1000000}
    assert used["total_tokens"] == prom_sum(prom, "kube_gateway_budget_used",
                                            budget="team-daily", measure="total_tokens") > 0
    assert [p.as_int for _, _, p in otlp_points(last, "kube_gateway.store_queue_depth")] == [0]

    payload = b"".join(Receiver.raw)
    assert marker.encode() not in payload and b"example.com" not in payload, "no prompt text"


def test_each_export_can_be_turned_off_with_the_standard_variables(tmp_path):
    """OTEL_TRACES_EXPORTER=none: metrics only; OTEL_METRICS_EXPORTER=none: spans only;
    a sampler that samples nothing (OTEL_TRACES_SAMPLER): metrics only."""
    for off, value, want in (("OTEL_TRACES_EXPORTER", "none", "/v1/metrics"),
                             ("OTEL_METRICS_EXPORTER", "none", "/v1/traces"),
                             ("OTEL_TRACES_SAMPLER", "always_off", "/v1/metrics")):
        paths = []

        class Counting(Receiver):
            def do_POST(self):
                paths.append(self.path)
                super().do_POST()

        otlp_port = free_port()
        server = serve_otlp(otlp_port, Counting)
        run = tmp_path / off
        run.mkdir()
        (run / "policy.yaml").write_text("apiVersion: kube-gateway.io/v1alpha1\n")
        demo, gw, gw_port = start_gateway(run, otlp_port, ["--store", "none"],
                                          OTEL_METRIC_EXPORT_INTERVAL="200", **{off: value})
        try:
            wait_listening(gw_port, gw, "gateway")
            oa = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="x", max_retries=0)
            oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        finally:
            stop(gw, demo, server)
        assert paths and set(paths) == {want}, (off, paths)
