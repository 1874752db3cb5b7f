"""The driver and the report of gateway/benches/soak.sh (see gateway/benches/README.md).

    python soak.py drive  --gateway HOST:PORT --admin HOST:PORT --pid PID --seconds S
                          --rate R --samples CSV --summary JSON
    python soak.py report --samples CSV --summary JSON --db SQLITE --warmup S

`drive` sends mixed traffic at R requests/s (open loop: a request starts every 1/R s
whatever the others do, at most 256 in flight) for S seconds and samples the gateway
process every 10 s. `report` prints the samples a minute apart, fits RSS, open fds and
threads after the warm-up, and checks that every request has its row; it exits 1 if a
check fails.

Each kind of request names its own model, so the store's `requested_model` column says
which kind a row is; the driver counts what it sent the same way.
"""

import argparse
import asyncio
import csv
import json
import os
import random
import sqlite3
import sys
import time

import httpx

# kind: (weight, dialect, path, streamed, extra headers, hang up after N chunks)
KINDS = {
    "openai-stream": (22, "openai", "/v1/chat/completions", True, {}, None),
    "openai-plain": (18, "openai", "/v1/chat/completions", False, {}, None),
    "ollama-stream": (14, "ollama", "/api/chat", True, {}, None),
    "ollama-plain": (10, "ollama", "/api/generate", False, {}, None),
    # The policy's budget allows this model 60 requests a minute: the rest get 429.
    "budget": (10, "openai", "/v1/chat/completions", False, {}, None),
    "hangup-openai": (6, "openai", "/v1/chat/completions", True, {}, 2),
    "hangup-ollama": (5, "ollama", "/api/chat", True, {}, 2),
    "error-500": (5, "openai", "/v1/chat/completions", False, {"x-demo-fault": "status-500"}, None),
    "error-500-ollama": (3, "ollama", "/api/chat", True, {"x-demo-fault": "status-500"}, None),
    "reset-midstream": (7, "openai", "/v1/chat/completions", True,
                        {"x-demo-fault": "reset-midstream"}, None),
}
# Outcomes a kind's rows may have, "allowed" or "redacted" (the policy masks a word) where
# not listed; anything else is reported, not failed (e.g. a hang-up that came after the
# answer's end is "allowed").
EXPECTED = {
    "budget": {"allowed", "redacted", "denied"},
    "hangup-openai": {"client_cancelled"},
    "hangup-ollama": {"client_cancelled"},
    "error-500": {"upstream_error", "allowed"},
    "error-500-ollama": {"upstream_error", "allowed"},
    "reset-midstream": {"upstream_error"},
}
MODEL_PREFIX = "soak-"
SAMPLE_EVERY = 10.0
MAX_IN_FLIGHT = 256


def body(kind, rng):
    _, dialect, path, streamed, _, _ = KINDS[kind]
    model = MODEL_PREFIX + kind
    text = f"Soak request {rng.randrange(10**6)}: summarize the cluster's token usage."
    if dialect == "openai":
        b = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 64}
        if streamed:
            b["stream"] = True
        return b
    if path == "/api/generate":
        return {"model": model, "prompt": text, "stream": streamed}
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": streamed}


class Counts:
    def __init__(self):
        self.by_kind = {}  # kind -> {"answered": n, "unsure": n, "status": {code: n}}
        self.sent = 0
        self.done = 0

    def add(self, kind, status=None, unsure=False):
        k = self.by_kind.setdefault(kind, {"answered": 0, "unsure": 0, "status": {}})
        if unsure:
            k["unsure"] += 1
        else:
            k["answered"] += 1
            k["status"][str(status)] = k["status"].get(str(status), 0) + 1
        self.done += 1


async def one(client, kind, rng, counts):
    _, _, path, _, headers, hang_up = KINDS[kind]
    status = None
    try:
        async with client.stream("POST", path, json=body(kind, rng), headers=headers) as r:
            status = r.status_code
            chunks = 0
            async for _ in r.aiter_raw():
                chunks += 1
                if hang_up is not None and chunks >= hang_up:
                    break  # leaving the block closes the connection mid-answer: a hang-up
        counts.add(kind, status)
    except httpx.HTTPError as e:
        if status is not None:
            # The answer began, then broke (an upstream reset passed on): it has its row.
            counts.add(kind, f"{status}, broken")
        else:
            # No answer: the request may or may not have reached the gateway.
            counts.add(kind, unsure=True)
            print(f"soak: {kind}: {e!r}", file=sys.stderr)


def read_proc(pid):
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return int(status["VmRSS"].split()[0]), fds, int(status["Threads"])


def metric_sums(text, names):
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


METRICS = ["kube_gateway_requests_total", "kube_gateway_store_queue_depth",
           "kube_gateway_spool_rows", "kube_gateway_usage_records_dropped_total"]
COLUMNS = ["t_s", "rss_kb", "fds", "threads", "sent", "done", "in_flight",
           "gw_requests", "store_queue", "spool_rows", "records_dropped"]


async def sampler(args, counts, start, stop, writer, out):
    async with httpx.AsyncClient(base_url=f"http://{args.admin}", timeout=5) as admin:
        n = 0
        while True:
            rss, fds, threads = read_proc(args.pid)
            try:
                m = metric_sums((await admin.get("/metrics")).text, METRICS)
            except httpx.HTTPError:
                m = dict.fromkeys(METRICS, float("nan"))
            writer.writerow([round(time.monotonic() - start, 1), rss, fds, threads, counts.sent,
                             counts.done, counts.sent - counts.done,
                             int(m[METRICS[0]]), int(m[METRICS[1]]), int(m[METRICS[2]]),
                             int(m[METRICS[3]])])
            out.flush()
            if stop.is_set():
                return
            n += 1
            try:
                await asyncio.wait_for(stop.wait(), start + n * SAMPLE_EVERY - time.monotonic())
            except asyncio.TimeoutError:
                pass


async def drive(args):
    rng = random.Random(17)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    counts = Counts()
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=64)
    out = open(args.samples, "w", newline="")
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    start = time.monotonic()
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(args, counts, start, stop, writer, out))
    tasks = set()
    async with httpx.AsyncClient(base_url=f"http://{args.gateway}", limits=limits,
                                 timeout=httpx.Timeout(60, connect=5)) as client:
        i = 0
        while True:
            at = start + i / args.rate
            if at - start >= args.seconds:
                break
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            i += 1
            if len(tasks) >= MAX_IN_FLIGHT:
                continue  # open loop, but bounded: a stalled gateway must not pile up tasks
            kind = rng.choices(kinds, weights)[0]
            counts.sent += 1
            t = asyncio.create_task(one(client, kind, rng, counts))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    stop.set()
    await sampling
    out.close()
    skipped = i - counts.sent
    with open(args.summary, "w") as f:
        json.dump({"seconds": args.seconds, "rate": args.rate, "sent": counts.sent,
                   "done": counts.done, "skipped_in_flight_cap": skipped,
                   "kinds": counts.by_kind}, f, indent=1)
    print(f"soak: sent {counts.sent} requests in {time.monotonic() - start:.0f} s "
          f"({counts.sent / args.seconds:.1f}/s), {counts.done} finished, {skipped} skipped "
          f"(in-flight cap)")


def fit(xs, ys):
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def report(args):
    rows = list(csv.DictReader(open(args.samples)))
    summary = json.load(open(args.summary))
    ok = True
    print(f"samples every {SAMPLE_EVERY:.0f} s ({len(rows)}), one a minute shown; all in {args.samples}")
    print(f"{'t':>6} {'RSS MiB':>8} {'fds':>5} {'threads':>7} {'sent':>7} {'in flight':>9} "
          f"{'gw requests':>11} {'store queue':>11} {'spool':>5} {'dropped':>7}")
    last_minute = -1
    for i, r in enumerate(rows):
        t = float(r["t_s"])
        if int(t // 60) != last_minute or i == len(rows) - 1:
            last_minute = int(t // 60)
            print(f"{t:>5.0f}s {int(r['rss_kb']) / 1024:>8.1f} {r['fds']:>5} {r['threads']:>7} "
                  f"{r['sent']:>7} {r['in_flight']:>9} {r['gw_requests']:>11} "
                  f"{r['store_queue']:>11} {r['spool_rows']:>5} {r['records_dropped']:>7}")

    after = [r for r in rows if float(r["t_s"]) >= args.warmup]
    print()
    if len(after) < 3:
        print(f"slopes: fewer than 3 samples after the {args.warmup:.0f} s warm-up: not fitted (FAIL)")
        ok = False
    else:
        span = float(after[-1]["t_s"]) - float(after[0]["t_s"])
        print(f"after the {args.warmup:.0f} s warm-up: {len(after)} samples over {span:.0f} s, "
              "least-squares slope per hour (limit)")
        xs = [float(r["t_s"]) / 3600 for r in after]
        # A slope fails when it is over its limit and the growth it fits over the window is
        # over the noise floor (allocator and connection churn): a short run's slope is noisy.
        for name, col, scale, unit, limit, floor in [
            ("RSS", "rss_kb", 1 / 1024, "MiB", args.max_rss_mib_h, 2),
            ("open fds", "fds", 1, "", args.max_fds_h, 20),
            ("threads", "threads", 1, "", args.max_threads_h, 2),
        ]:
            ys = [float(r[col]) * scale for r in after]
            slope, _ = fit(xs, ys)
            growth = slope * span / 3600
            bad = slope > limit and growth > floor
            ok &= not bad
            verdict = "FAIL" if bad else "ok" if slope <= limit else f"ok (under the noise floor, {floor:g})"
            print(f"  {name:<9} {slope:>+9.2f} {unit}/h  (limit {limit:g}; {growth:+.1f} over the window; "
                  f"from {min(ys):.1f} to {max(ys):.1f}, mean {sum(ys) / len(ys):.1f})  {verdict}")
        dropped = int(rows[-1]["records_dropped"])
        if dropped:
            print(f"  usage records dropped by the recorder: {dropped}  FAIL")
            ok = False

    db = sqlite3.connect(args.db)
    stored = {}
    for model, outcome, status, n in db.execute(
            "SELECT requested_model, outcome, status, count(*) FROM usage_events GROUP BY 1, 2, 3"):
        kind = (model or "")[len(MODEL_PREFIX):] if (model or "").startswith(MODEL_PREFIX) else f"?{model}"
        stored.setdefault(kind, {}).setdefault(outcome, {})[status] = n
    print()
    print("rows by kind: the driver's count (answers, plus requests that broke before one) vs")
    print("the store's rows, by outcome (status: rows)")
    print(f"{'kind':<17} {'sent':>6} {'unsure':>6} {'rows':>6}  check  outcomes in the store  |  statuses the driver saw")
    total_sent = total_rows = 0
    for kind in sorted(set(KINDS) | set(stored)):
        d = summary["kinds"].get(kind, {"answered": 0, "unsure": 0, "status": {}})
        outcomes = stored.get(kind, {})
        n_rows = sum(sum(s.values()) for s in outcomes.values())
        sent, unsure = d["answered"], d["unsure"]
        total_sent += sent
        total_rows += n_rows
        good = sent <= n_rows <= sent + unsure and kind in KINDS
        unexpected = set(outcomes) - EXPECTED.get(kind, {"allowed", "redacted"})
        ok &= good
        shown = ", ".join(f"{o} ({', '.join(f'{s}: {n}' for s, n in sorted(st.items()))})"
                          for o, st in sorted(outcomes.items()))
        print(f"{kind:<17} {sent:>6} {unsure:>6} {n_rows:>6}  {'ok' if good else 'FAIL':<5}  "
              f"{shown}{'  (unexpected: ' + ', '.join(sorted(unexpected)) + ')' if unexpected else ''}"
              f"  |  {', '.join(f'{s}: {n}' for s, n in sorted(d['status'].items()))}")
    print(f"{'total':<17} {total_sent:>6} {'':>6} {total_rows:>6}")
    print()
    print("soak: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--gateway", required=True)
    d.add_argument("--admin", required=True)
    d.add_argument("--pid", type=int, required=True)
    d.add_argument("--seconds", type=float, required=True)
    d.add_argument("--rate", type=float, required=True)
    d.add_argument("--samples", required=True)
    d.add_argument("--summary", required=True)
    r = sub.add_parser("report")
    r.add_argument("--samples", required=True)
    r.add_argument("--summary", required=True)
    r.add_argument("--db", required=True)
    r.add_argument("--warmup", type=float, default=120)
    r.add_argument("--max-rss-mib-h", type=float, default=16)
    r.add_argument("--max-fds-h", type=float, default=60)
    r.add_argument("--max-threads-h", type=float, default=10)
    args = p.parse_args()
    if args.cmd == "drive":
        asyncio.run(drive(args))
        return 0
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
