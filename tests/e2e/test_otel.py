"""OpenTelemetry export through the real binaries: with OTEL_EXPORTER_OTLP_ENDPOINT set,
the gateway sends one span per LLM request over OTLP/HTTP (decoded here with the official
OpenTelemetry protobuf definitions) with the GenAI attributes, a guardrail event for each
rule that acted, and no prompt text."""

import os
import signal
import subprocess
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import ollama
import openai
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest, ExportTraceServiceResponse)

from conftest import binary, free_port, start, wait_listening


class Receiver(BaseHTTPRequestHandler):
    spans, raw = [], []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Receiver.raw.append(body)
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


def test_one_span_per_request_with_the_genai_attributes(tmp_path):
    otlp_port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", otlp_port), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "policy.yaml").write_text(
        "apiVersion: kube-gateway.io/v1alpha1\n"
        "models:\n  rewrite:\n    - { from: llama3.2:1b, to: gemma2:2b }\n"
        "promptRules:\n  - { name: emails, match: { detector: email }, action: redact }\n")
    demo_port, gw_port = free_port(), free_port()
    demo = start([binary("ai-demo"), "serve", "--listen", f"127.0.0.1:{demo_port}"],
                 demo_port, "demo", tmp_path / "demo.log")
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{otlp_port}",
               OTEL_BSP_SCHEDULE_DELAY="200")
    gw = subprocess.Popen([binary("kube-gateway"), "run", "--listen", f"127.0.0.1:{gw_port}",
                           "--upstream", f"127.0.0.1:{demo_port}", "--store", "none",
                           "--policy", str(tmp_path / "policy.yaml"),
                           "--pod-namespace", "team-a", "--pod-name", "app-1"],
                          env=env, stdout=open(tmp_path / "gw.log", "wb"), stderr=subprocess.STDOUT)
    marker = f"secret-{uuid.uuid4().hex}"
    try:
        wait_listening(gw_port, gw, "gateway")
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="x", max_retries=0)
        answers = [oa.chat.completions.create(model="llama3.2:1b", messages=[
            {"role": "user", "content": f"{marker} {i}"}]) for i in range(3)]
        chat = ollama.Client(host=f"http://127.0.0.1:{gw_port}").chat(
            model="llama3.2:1b", messages=[{"role": "user", "content": "mail ops@example.com"}])
    finally:
        gw.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0
        demo.terminate()
        demo.wait(timeout=15)
        server.shutdown()
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
    last = attrs(spans[3][1])
    assert last["gen_ai.provider.name"] == "ollama"
    assert last["gen_ai.usage.output_tokens"] == chat.eval_count
    events = [(e.name, {x.key: x.value.string_value for x in e.attributes}) for e in spans[3][1].events]
    assert events == [("gen_ai.guardrail.rule", {"gen_ai.guardrail.rule.name": "emails",
                                                  "gen_ai.guardrail.action": "redacted"})]
    payload = b"".join(Receiver.raw)
    assert marker.encode() not in payload and b"example.com" not in payload, "no prompt text"
