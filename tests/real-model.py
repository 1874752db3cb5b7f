"""The token-truth check against a real small model (run by tests/real-model.sh, which
starts llama.cpp's server and kube-gateway in front of it).

First teaches the gateway as ordinary traffic would: 10 whole (non-streamed) answers,
whose usage the server reports and the gateway calibrates its estimates with, and 6
streamed ones (no usage: they show the gateway that this server's content events add up
to the calibrated count), all with prompts of their own. Their rows must hold the
server's counts exactly, marked `provider` (the whole answers). Then it sends 20 streamed chat answers of varied lengths and prompts with the official `openai`
client through the gateway, gets the truth for each (the same request non-streamed,
directly to the server, temperature 0 and a fixed seed: its usage, once its text is
checked to be the streamed one; otherwise the server's tokenize endpoint on the streamed
text), reads what the gateway recorded, prints a table and a summary per token source,
and exits 1 if any recorded output count is off the truth by more than 2 % or any prompt
count by more than 10 %.

    python tests/real-model.py --gateway URL --server URL --model NAME --store DB --log FILE
    (--send: the requests only; --check: the table only, after the gateway stopped)
"""
import argparse
import json
import sqlite3
import sys
import urllib.request

from openai import OpenAI

OUTPUT_TOLERANCE = 2.0  # per cent
PROMPT_TOLERANCE = 10.0

LONG = (
    "Kubernetes schedules pods onto nodes, and each pod may run several containers that "
    "share a network namespace. Services give a stable address to a changing set of pods, "
    "and an ingress or a gateway routes outside traffic to them. Operators watch custom "
    "resources and reconcile the cluster towards the state they describe. "
)

SYSTEM = "You are a terse assistant for platform engineers. Answer plainly."


def user(text):
    return [{"role": "user", "content": text}]


def system(text):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def conversation(turns):
    msgs = []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


# (label, messages, max_tokens): short, long, multi-message and system prompts, answers
# cut at 10..120 tokens or ended by the model.
CASES = [
    ("short", user("Hi!"), 10),
    ("short", user("What is a pod?"), 40),
    ("short", user("Name three colours."), 20),
    ("short", user("Write a haiku about networks."), 60),
    ("short", user("Count from one to twenty in words."), 120),
    ("long", user(LONG + "Summarise this in one sentence."), 50),
    ("long", user(LONG * 3 + "What are the key ideas?"), 120),
    ("long", user(LONG * 2 + "List the nouns."), 80),
    ("long", user("Explain, step by step, how DNS works inside a cluster. " * 4), 100),
    ("multi", conversation(["Hello.", "Hello! How can I help?", "Tell me a joke."]), 60),
    ("multi", conversation(["What is Rust?", "A systems programming language.",
                            "Why is it safe?"]), 90),
    ("multi", conversation(["Pick a number.", "Seven.", "Double it.", "Fourteen.",
                            "Now halve it and explain."]), 45),
    ("multi", conversation(["Translate 'cat' to French.", "Chat.", "And dog?"]), 15),
    ("system", system("What is a service mesh?"), 70),
    ("system", system("Give one tip for writing YAML."), 30),
    ("system", system(LONG + "Is this accurate?"), 110),
    ("system", system("Reply with a single word: yes or no. Is water wet?"), 10),
    ("mixed", [{"role": "system", "content": SYSTEM}] + conversation(
        ["Describe a gateway.", "It routes traffic.", "And a guardrail?"]), 85),
    ("unicode", user("Écris une phrase en français sur les données, s'il te plaît. 🙂"), 50),
    ("code", user("Write a Python function that reverses a string."), 120),
]
SEED = 42

# What the gateway learns from before the measured answers: other prompts, whole answers
# (usage reported) then streams (none), with system prompts and conversations among them
# so the fit sees the template's per-message cost and the system text the server drops.
TRAINING = [
    (False, user("Tell me about containers."), 40),
    (False, conversation(["Hi.", "Hello!", "What is YAML?"]), 60),
    (False, system("Explain what a node is."), 50),
    (False, user(LONG + "Give it a title."), 20),
    (False, conversation(["Ping.", "Pong.", "Again.", "Pong.", "Once more, with feeling."]), 30),
    (False, system(LONG * 2 + "What is missing?"), 90),
    (False, user("List four HTTP methods and what each is for."), 100),
    (False, conversation(["Define latency.", "The delay before a response."] * 2
                         + ["And throughput?"]), 70),
    (False, system("Say hello in Spanish."), 15),
    (False, user("Explain how a load balancer chooses a backend. " * 3), 120),
    (True, user("Describe a namespace in two sentences."), 60),
    (True, conversation(["What is TLS?", "Transport Layer Security.", "Why use it?"]), 80),
    (True, system("Name a Linux command for disk usage."), 30),
    (True, user(LONG + "Rewrite it for a child."), 100),
    (True, user("What does a reverse proxy do?"), 50),
    (True, conversation(["One.", "Two.", "Three?"]), 20),
]


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def train(client, args):
    """The training answers through the gateway, in order; the usage of the whole ones."""
    out = []
    for stream, messages, max_tokens in TRAINING:
        answer = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=max_tokens, stream=stream,
            temperature=0, seed=SEED)
        if stream:
            for _ in answer:
                pass
            out.append(None)
        else:
            out.append([answer.usage.prompt_tokens, answer.usage.completion_tokens])
    return out


def send(args):
    """The streamed answers through the gateway, in order; their texts and event counts."""
    client = OpenAI(base_url=args.gateway + "/v1", api_key="unused", max_retries=0)
    trained = train(client, args)
    out = []
    for label, messages, max_tokens in CASES:
        stream = client.chat.completions.create(
            model=args.model, messages=messages, max_tokens=max_tokens, stream=True,
            temperature=0, seed=SEED)
        text, events, usage = [], 0, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta and choice.delta.content:
                    text.append(choice.delta.content)
                    events += 1
        out.append({"label": label, "text": "".join(text), "events": events,
                    "client_usage": usage is not None})
    return trained, out


def truth(args, sent):
    """Per case: true prompt and output counts, and how the output truth was found."""
    server = args.server
    rows = []
    for (label, messages, max_tokens), s in zip(CASES, sent):
        whole = post(server + "/v1/chat/completions", {
            "model": args.model, "messages": messages, "max_tokens": max_tokens,
            "stream": False, "temperature": 0, "seed": SEED})
        text = whole["choices"][0]["message"]["content"] or ""
        usage = whole["usage"]
        tokenized = len(post(server + "/extras/tokenize",
                             {"input": s["text"]})["tokens"])
        same = text == s["text"]
        rows.append({
            "prompt": usage["prompt_tokens"],
            # The server's own count of the same answer; the tokenize endpoint's count
            # of the streamed text when the answers differ.
            "output": usage["completion_tokens"] if same else tokenized,
            "output_truth": "usage" if same else "tokenize",
            "tokenized": tokenized,
        })
    return rows


def recorded(args):
    """The gateway's rows in arrival order, with each count's source from its access log."""
    db = sqlite3.connect(args.store)
    rows = db.execute(
        "SELECT request_id, input_tokens, output_tokens, token_source FROM usage_events "
        "WHERE endpoint = 'chat_completions' ORDER BY time_ms, "
        "CAST(substr(request_id, length(rtrim(request_id, '0123456789')) + 1) AS INTEGER)"
    ).fetchall()
    sources = {}
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            fields = ev.get("fields", ev)
            rid = fields.get("request_id")
            if rid:
                sources[rid] = (fields.get("input_source", "?"), fields.get("output_source", "?"))
    return [{"id": r[0], "prompt": r[1], "output": r[2], "source": r[3],
             "sources": sources.get(r[0], ("?", "?"))} for r in rows]


def err(got, want):
    return 0.0 if want == got else (100.0 * (got - want) / want if want else float("inf"))


def report(trained, sent, truths, rows):
    if len(rows) != len(TRAINING) + len(CASES):
        print(f"expected {len(TRAINING) + len(CASES)} recorded rows, found {len(rows)}",
              file=sys.stderr)
        return 1
    training, rows = rows[:len(TRAINING)], rows[len(TRAINING):]
    wrong = [f"#{i} recorded {r['prompt']}/{r['output']} {'/'.join(r['sources'])}, "
             f"server {u[0]}/{u[1]}"
             for i, (u, r) in enumerate(zip(trained, training), 1)
             if u is not None and ([r["prompt"], r["output"]] != u
                                   or r["sources"] != ("provider", "provider"))]
    whole = sum(u is not None for u in trained)
    print(f"training: {whole} whole answers recorded with the server's counts, marked "
          f"provider: {whole - len(wrong)} of {whole}; "
          f"then {len(trained) - whole} streams "
          f"({', '.join('/'.join(r['sources']) for r in training[whole:])})\n")
    head = (f"{'#':>2} {'case':8} {'max':>4} {'events':>6} {'true p/o':>9} {'truth':8} "
            f"{'tok(o)':>6} {'rec p/o':>9} {'err p %':>8} {'err o %':>8}  source (in/out)")
    print(head)
    print("-" * len(head))
    failed, by_source = [], {}
    for i, ((label, _, max_tokens), s, t, r) in enumerate(zip(CASES, sent, truths, rows), 1):
        ep, eo = err(r["prompt"], t["prompt"]), err(r["output"], t["output"])
        src = "/".join(r["sources"]) if r["sources"] != ("?", "?") else r["source"]
        print(f"{i:>2} {label:8} {max_tokens:>4} {s['events']:>6} "
              f"{t['prompt']:>4}/{t['output']:<4} {t['output_truth']:8} {t['tokenized']:>6} "
              f"{r['prompt']:>4}/{r['output']:<4} {ep:>+8.1f} {eo:>+8.1f}  {src}")
        agg = by_source.setdefault(src, [0, 0.0, 0.0, 0.0, 0.0])
        agg[0] += 1
        agg[1] += abs(ep)
        agg[2] = max(agg[2], abs(ep))
        agg[3] += abs(eo)
        agg[4] = max(agg[4], abs(eo))
        if abs(eo) > OUTPUT_TOLERANCE:
            failed.append(f"#{i} output {eo:+.1f} %")
        if abs(ep) > PROMPT_TOLERANCE:
            failed.append(f"#{i} prompt {ep:+.1f} %")
    print()
    print(f"{'source (in/out)':24} {'n':>3} {'mean |err p| %':>15} {'max':>7} "
          f"{'mean |err o| %':>15} {'max':>7}")
    for src, (n, sp, mp, so, mo) in sorted(by_source.items()):
        print(f"{src:24} {n:>3} {sp / n:>15.1f} {mp:>7.1f} {so / n:>15.1f} {mo:>7.1f}")
    same = sum(t["output_truth"] == "usage" for t in truths)
    print(f"\noutput truth: the server's usage of the same answer non-streamed for {same} "
          f"of {len(CASES)} (the rest: its tokenize endpoint on the streamed text)")
    print(f"thresholds: output within {OUTPUT_TOLERANCE} %, prompt within {PROMPT_TOLERANCE} %")
    failed += [f"training {w}" for w in wrong]
    if failed:
        print(f"FAILED ({len(failed)}): " + ", ".join(failed))
        return 1
    print("PASSED")
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", required=True)
    p.add_argument("--server", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--store")
    p.add_argument("--log")
    p.add_argument("--state", required=True, help="where --send leaves what --check reads")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--send", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.send:
        trained, sent = send(args)
        truths = truth(args, sent)
        with open(args.state, "w", encoding="utf-8") as f:
            json.dump({"trained": trained, "sent": sent, "truths": truths}, f)
        return 0
    with open(args.state, encoding="utf-8") as f:
        state = json.load(f)
    return report(state["trained"], state["sent"], state["truths"], recorded(args))


if __name__ == "__main__":
    sys.exit(main())
