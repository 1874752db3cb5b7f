#!/usr/bin/env python3
"""Writes the LLM-shaped bodies of gateway/benches/load.sh into a directory.

    python3 gateway/benches/llm_bodies.py DIR

Deterministic (a fixed seed), standard library only. Files:
  big_request.json   (a) a 64 KiB OpenAI chat request: 50 messages (system, user,
                     assistant, assistant tool calls and tool results) and 8 tool
                     definitions, not streaming
  big_answer.json    (a) the canned chat.completion the upstream answers it with
  sse_request.json   (b) a short streaming OpenAI chat request (include_usage)
  stream.sse         (b) its canned answer: a role chunk, 1,000 content chunks, a finish
                     chunk, a usage chunk and [DONE] (text/event-stream)
  ndjson_request.json (b) a short streaming Ollama /api/chat request
  stream.ndjson      (b) its canned answer: 1,000 content lines and a done line with
                     prompt_eval_count and eval_count (application/x-ndjson)
The text matches none of the benchmark policy's prompt rules (requests pass); one
content chunk in 100 of each stream holds a word its response rules mask.
"""

import json
import random
import sys
from pathlib import Path

REQUEST_BYTES = 64 * 1024
STREAM_EVENTS = 1000
MODEL = "llama3.2:1b"
WORDS = (
    "the cluster gateway routes each request to a model and meters the tokens it uses "
    "while the platform team reviews latency budgets namespaces and rollout plans for "
    "inference services running on shared nodes with quotas dashboards alerts and "
    "careful capacity planning across regions zones and release trains this week"
).split()
MASKED = "darn"  # the benchmark policy's response rules mask it


def words(rng, n_chars):
    """Plain prose of exactly n_chars ASCII characters (no escapes in JSON)."""
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        if out and rng.random() < 0.08:
            out[-1] += "."
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def tools():
    def fn(name, desc, props, required):
        return {"type": "function", "function": {
            "name": name, "description": desc,
            "parameters": {"type": "object", "properties": props, "required": required}}}
    s = {"type": "string"}
    return [
        fn("get_deployment", "Read a deployment's spec and status in a namespace.",
           {"namespace": s, "name": s}, ["namespace", "name"]),
        fn("list_pods", "List the pods of a namespace matching a label selector.",
           {"namespace": s, "selector": s, "limit": {"type": "integer"}}, ["namespace"]),
        fn("scale_deployment", "Set a deployment's replica count.",
           {"namespace": s, "name": s, "replicas": {"type": "integer", "minimum": 0}},
           ["namespace", "name", "replicas"]),
        fn("query_metrics", "Run a PromQL query over a time range.",
           {"query": s, "start": s, "end": s, "step": s}, ["query"]),
        fn("get_logs", "Fetch the last lines of a container's log.",
           {"namespace": s, "pod": s, "container": s, "tail": {"type": "integer"}},
           ["namespace", "pod"]),
        fn("open_ticket", "Open a ticket for the on-call team.",
           {"title": s, "body": s, "severity": {"type": "string", "enum": ["low", "medium", "high"]}},
           ["title", "body"]),
        fn("search_docs", "Search the internal runbooks.",
           {"query": s, "top_k": {"type": "integer"}}, ["query"]),
        fn("get_budget", "Read a namespace's token budget and what it has used.",
           {"namespace": s, "window": {"type": "string", "enum": ["hour", "day", "month"]}},
           ["namespace"]),
    ]


def big_request(rng):
    # System, then turns: two plain ones and one with a tool call, until the 50th
    # message, a user's.
    messages = [{"role": "system", "content": ""}]
    turn = 0
    while len(messages) < 49:
        turn += 1
        messages.append({"role": "user", "content": ""})
        if turn % 3 == 0:
            cid = f"call_{turn:04d}"
            messages.append({"role": "assistant", "content": None, "tool_calls": [{
                "id": cid, "type": "function", "function": {
                    "name": "list_pods",
                    "arguments": json.dumps({"namespace": "team-a", "selector": "app=web"})}}]})
            messages.append({"role": "tool", "tool_call_id": cid, "content": ""})
        messages.append({"role": "assistant", "content": ""})
    messages.append({"role": "user", "content": ""})
    body = {"model": MODEL, "messages": messages, "tools": tools(), "tool_choice": "auto",
            "temperature": 0.2, "max_tokens": 512, "stream": False}
    texts = [m for m in messages if m.get("content") == ""]
    overhead = len(json.dumps(body, separators=(",", ":")))
    share = (REQUEST_BYTES - overhead) // len(texts)
    for m in texts:
        m["content"] = words(rng, share)
    short = REQUEST_BYTES - len(json.dumps(body, separators=(",", ":")))
    texts[-1]["content"] = words(rng, share + short)
    raw = json.dumps(body, separators=(",", ":"))
    assert len(raw) == REQUEST_BYTES, len(raw)
    return raw


def big_answer(rng):
    return json.dumps({
        "id": "chatcmpl-bench-big", "object": "chat.completion", "created": 1700000000,
        "model": "gemma2:2b", "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": words(rng, 900),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 14210, "completion_tokens": 180, "total_tokens": 14390,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}}},
        separators=(",", ":"))


def short_messages():
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Explain how the gateway meters a streamed answer."}]


def token(rng, i):
    return " " + (MASKED if i % 100 == 50 else rng.choice(WORDS))


def sse(rng):
    head = {"id": "chatcmpl-bench-sse", "object": "chat.completion.chunk",
            "created": 1700000000, "model": "gemma2:2b", "system_fingerprint": "fp_bench"}

    def chunk(choices, usage=None):
        return "data: " + json.dumps({**head, "choices": choices, "usage": usage},
                                     separators=(",", ":")) + "\n\n"
    out = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                   "logprobs": None, "finish_reason": None}])]
    for i in range(STREAM_EVENTS):
        out.append(chunk([{"index": 0, "delta": {"content": token(rng, i)},
                           "logprobs": None, "finish_reason": None}]))
    out.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    out.append(chunk([], {"prompt_tokens": 24, "completion_tokens": STREAM_EVENTS,
                          "total_tokens": 24 + STREAM_EVENTS,
                          "prompt_tokens_details": {"cached_tokens": 0},
                          "completion_tokens_details": {"reasoning_tokens": 0}}))
    out.append("data: [DONE]\n\n")
    return "".join(out)


def ndjson(rng):
    # Ollama stamps every line with its own time (created_at changes line to line).
    def line(i, obj):
        at = f"2026-12-03T12:00:{i * 2.5 / 1000:012.9f}Z"
        return json.dumps({"model": "gemma2:2b", "created_at": at, **obj},
                          separators=(",", ":")) + "\n"
    out = [line(i, {"message": {"role": "assistant", "content": token(rng, i)}, "done": False})
           for i in range(STREAM_EVENTS)]
    out.append(line(STREAM_EVENTS, {"message": {"role": "assistant", "content": ""}, "done_reason": "stop",
                     "done": True, "total_duration": 2500000000, "load_duration": 1000000,
                     "prompt_eval_count": 24, "prompt_eval_duration": 10000000,
                     "eval_count": STREAM_EVENTS, "eval_duration": 2400000000}))
    return "".join(out)


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(18)
    files = {
        "big_request.json": big_request(rng),
        "big_answer.json": big_answer(rng),
        "sse_request.json": json.dumps({"model": MODEL, "messages": short_messages(),
                                        "stream": True,
                                        "stream_options": {"include_usage": True}}),
        "stream.sse": sse(rng),
        "ndjson_request.json": json.dumps({"model": MODEL, "messages": short_messages(),
                                           "stream": True}),
        "stream.ndjson": ndjson(rng),
    }
    for name, text in files.items():
        (out / name).write_text(text)


if __name__ == "__main__":
    main()
