"""A fake Kubernetes API server for tests: plain HTTP on loopback, speaking the real
REST protocol that kube-rs (watcher, reflector, events::Recorder), kubectl and the
official Python client use, for the resources kube-gateway's node agent needs: core/v1
Pods, ConfigMaps, Namespaces (read only) and Events, and events.k8s.io/v1 Events (the
same stored Events, converted as the real server does).

What it reproduces: list with resourceVersion, label and field selectors and limit +
continue pages; watch streams (chunked newline-delimited JSON) from a resourceVersion
out of a bounded history, with selector transitions sent as ADDED/DELETED, periodic
BOOKMARKs, sendInitialEvents, timeoutSeconds, and the 410 "too old resource version"
ERROR event once the history is compacted; create, replace, merge / strategic-merge /
JSON patch and delete with the real Status errors; discovery for kubectl (and a
meta.k8s.io Table when kubectl asks for one). Every request is logged (method, path,
query, verb, resource, content type) so tests can assert what a client did.

Library: `with FakeApiServer() as api: api.put(pod); api.write_kubeconfig(path)`.
CLI: `python3 tests/k8s/fake_apiserver.py --port P --seed FILE.json --log LOG`."""

import argparse
import copy
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The sibling modules, wherever this file is run or imported from.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import k8s_model as m  # noqa: E402
from k8s_store import Expired, Store, resource_of, unview, view  # noqa: E402

GVS = {"v1": "", "events.k8s.io/v1": "events.k8s.io"}  # group version -> group


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams
    server_version = "fake-apiserver"

    def log_message(self, *args):
        pass  # the structured request log replaces the stderr lines

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    @property
    def fake(self):
        return self.server.fake

    def dispatch(self):
        url = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        self.rec = {"ts": round(time.time(), 3), "method": self.command, "path": url.path,
                    "query": self.query, "verb": None, "group": None, "resource": None,
                    "namespace": None, "name": None,
                    "user_agent": self.headers.get("User-Agent", "")}
        if self.command in ("POST", "PUT", "PATCH"):
            self.rec["content_type"] = (self.headers.get("Content-Type") or "").split(";")[0]
        self.fake._record_start(self.rec)  # now, so that a running watch shows already
        try:
            self.body = self.read_body()
            self.route(url.path.rstrip("/") or "/")
        except m.ApiError as exc:
            self.send_json(exc.code, exc.status())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # answered, so one bug shows as a 500, not a hang
            traceback.print_exc()
            self.send_json(500, m.ApiError(500, "InternalError", repr(exc)).status())
        finally:
            self.fake._record_end(self.rec)

    def read_body(self):
        if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""
        body = b""  # a streamed body (no client here sends one, but HTTP allows it)
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if not size:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers, up to the blank line
                return body
            body += self.rfile.read(size + 2)[:size]  # each chunk ends with CRLF

    def send_json(self, code, obj):
        data = m.dumps(obj).encode()
        self.rec["status"] = code
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def json_body(self):
        ctype = self.rec.get("content_type", "")
        if self.command != "PATCH" and ctype not in ("", "application/json"):
            raise m.ApiError(415, "UnsupportedMediaType",
                             f"the fake serves JSON bodies only, not {ctype}")
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise m.ApiError(400, "BadRequest", f"the request body is not JSON: {exc}")

    def route(self, path):
        docs = {"/version": m.version_doc, "/apis": m.api_group_list_doc,
                "/api": lambda: m.api_versions_doc(self.fake.address),
                "/apis/events.k8s.io": m.api_group_doc}
        if path in docs:
            self.rec["verb"] = self.command.lower()
            return self.send_json(200, docs[path]())
        if path in ("/healthz", "/livez", "/readyz"):
            self.rec["status"] = 200
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "2")
            self.end_headers()
            return self.wfile.write(b"ok")
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            gv, rest = "v1", parts[2:]
        elif parts[:3] == ["apis", "events.k8s.io", "v1"]:
            gv, rest = "events.k8s.io/v1", parts[3:]
        else:
            # /openapi/v2 and /openapi/v3 land here too: kubectl get, annotate, label
            # and delete do without them; create and apply need --validate=false.
            raise m.ApiError(404, "NotFound", "the server could not find the requested "
                             "resource")
        if not rest:
            self.rec["verb"] = "get"
            return self.send_json(200, m.resource_list_doc(gv))
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        if (gv, rest[0]) not in m.RESOURCES or len(rest) > 2:
            raise m.ApiError(404, "NotFound", "the server could not find the requested "
                             "resource")
        resource, name = rest[0], (rest[1] if len(rest) == 2 else None)
        watch = self.query.get("watch") in ("true", "1")
        verb = {("GET", False): "watch" if watch else "list", ("GET", True): "get",
                ("POST", False): "create", ("PUT", True): "update",
                ("PATCH", True): "patch", ("DELETE", True): "delete"}.get(
                    (self.command, name is not None))
        self.rec.update(verb=verb, group=GVS[gv], resource=resource, namespace=ns,
                        name=name)
        namespaced = m.RESOURCES[(gv, resource)]["namespaced"]
        if verb not in m.RESOURCES[(gv, resource)]["verbs"] or (
                verb in ("create", "get", "update", "patch", "delete")
                and namespaced and ns is None):
            raise m.ApiError(405, "MethodNotAllowed", "the server does not allow this "
                             "method on the requested resource")
        getattr(self, "verb_" + verb)(gv, resource, ns, name)

    def matcher(self, gv, resource, ns):
        labels = m.parse_label_selector(self.query.get("labelSelector"))
        fields = m.parse_field_selector(self.query.get("fieldSelector"), resource, gv)
        return lambda o: ((ns is None or o["metadata"].get("namespace") == ns)
                          and m.labels_match(labels, o) and m.fields_match(fields, o))

    def verb_list(self, gv, resource, ns, _name):
        try:
            limit = int(self.query.get("limit") or 0)
        except ValueError:
            raise m.ApiError(400, "BadRequest", "limit must be an integer") from None
        # resourceVersion / resourceVersionMatch are accepted and the newest state is
        # served: it satisfies rv=0 and NotOlderThan (Exact of an old rv it cannot).
        rv, items, more, remaining = self.fake.store.list(
            resource, self.matcher(gv, resource, ns), limit, self.query.get("continue"))
        if m.wants_table(self.headers.get("Accept")):
            table = m.to_table(resource, items, rv)
            table["metadata"]["continue"] = more
            return self.send_json(200, table)
        meta = {"resourceVersion": rv}
        if more:
            meta.update({"continue": more, "remainingItemCount": remaining})
        if m.wants_metadata(self.headers.get("Accept")):
            return self.send_json(200, {"kind": "PartialObjectMetadataList",
                                        "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                                        "items": [m.partial(o) for o in items]})
        kind = m.RESOURCES[(gv, resource)]["kind"]
        # Items carry no kind/apiVersion in a real server's JSON lists; only the list does.
        out = []
        for o in items:
            o = view(gv, resource, o)
            out.append({k: v for k, v in o.items() if k not in ("kind", "apiVersion")})
        self.send_json(200, {"kind": kind + "List", "apiVersion": gv, "metadata": meta,
                             "items": out})

    def verb_get(self, gv, resource, ns, name):
        obj = self.fake.store.get(resource, ns, name)
        if m.wants_table(self.headers.get("Accept")):
            return self.send_json(200, m.to_table(resource, [obj],
                                                  obj["metadata"]["resourceVersion"]))
        if m.wants_metadata(self.headers.get("Accept")):
            return self.send_json(200, m.partial(obj))
        self.send_json(200, view(gv, resource, obj))

    def verb_create(self, gv, resource, ns, _name):
        body = self.json_body()
        if not isinstance(body, dict):
            raise m.ApiError(400, "BadRequest", "the request body is not an object")
        if resource == "events" and gv == "events.k8s.io/v1":
            m.validate_event_v1(body)
        obj = self.fake.store.create(resource, ns, unview(gv, resource, body))
        self.send_json(201, view(gv, resource, obj))

    def verb_update(self, gv, resource, ns, name):
        obj = self.fake.store.replace(resource, ns, name,
                                      unview(gv, resource, self.json_body()))
        self.send_json(200, view(gv, resource, obj))

    def verb_patch(self, gv, resource, ns, name):
        obj = self.fake.store.patch(gv, resource, ns, name, self.rec["content_type"],
                                    self.json_body())
        self.send_json(200, view(gv, resource, obj))

    def verb_delete(self, gv, resource, ns, name):
        obj = self.fake.store.delete(resource, ns, name)
        if resource == "pods":  # Pods come back whole; other kinds as a Success Status
            return self.send_json(200, view(gv, resource, obj))
        self.send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                             "status": "Success",
                             "details": {"name": name, "group": GVS[gv], "kind": resource,
                                         "uid": obj["metadata"]["uid"]}})

    # ---- watch ----

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def send_event(self, type_, obj):
        self.chunk(m.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def client_gone(self):
        """A closed client shows as a readable socket with nothing to read."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def verb_watch(self, gv, resource, ns, _name):
        match, store = self.matcher(gv, resource, ns), self.fake.store
        table = m.wants_table(self.headers.get("Accept"))
        metadata_only = m.wants_metadata(self.headers.get("Accept"))
        bookmarks = self.query.get("allowWatchBookmarks") in ("true", "1")
        initial_end = self.query.get("sendInitialEvents") == "true"
        timeout = float(self.query.get("timeoutSeconds") or self.fake.watch_timeout)
        kind = m.RESOURCES[(gv, resource)]["kind"]

        def out(obj):
            if table:
                return m.to_table(resource, [obj], obj["metadata"]["resourceVersion"])
            return m.partial(obj) if metadata_only else view(gv, resource, obj)

        def bookmark(rv, annotations=None):
            meta = {"resourceVersion": str(rv)}
            if annotations:
                meta["annotations"] = annotations
            # kind and apiVersion too: kube-rs's Bookmark type requires them.
            kind_gv = ("PartialObjectMetadata", "meta.k8s.io/v1") if metadata_only else (
                kind, gv)
            self.send_event("BOOKMARK", {"kind": kind_gv[0], "apiVersion": kind_gv[1],
                                         "metadata": meta})

        expired = None
        try:
            cursor, initial, mark = store.watch_start(resource, self.query.get(
                "resourceVersion", ""), initial_end)
        except Expired as exc:
            expired = str(exc)
        # A real server answers 200 and then an ERROR event, not an HTTP 410.
        self.rec["status"] = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        try:
            if expired is None:
                for obj in initial:
                    if match(obj):
                        self.send_event("ADDED", out(obj))
                if initial_end and bookmarks:
                    bookmark(cursor, {"k8s.io/initial-events-end": "true"})
                expired = self.stream(resource, match, out, bookmark, bookmarks,
                                      cursor, mark, time.monotonic() + timeout)
            if expired:
                self.send_event("ERROR", m.ApiError(410, "Expired", expired).status())
            self.chunk(b"")  # the zero-length chunk ends the stream cleanly
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def stream(self, resource, match, out, bookmark, bookmarks, cursor, mark, deadline):
        """Sends the changes after cursor until the deadline; the expiry message if the
        history dropped changes this watch had not sent yet."""
        interval = self.fake.bookmark_interval
        next_bookmark = time.monotonic() + interval
        while not self.fake.store.stopping:
            now = time.monotonic()
            if now >= deadline or self.client_gone():
                return None
            wake = min(deadline, next_bookmark if bookmarks else deadline, now + 0.5)
            try:
                entries, current, ended = self.fake.store.wait_events(
                    cursor, max(wake - now, 0), mark)
            except Expired as exc:
                return str(exc)
            for _rv, res, type_, new, old in entries:
                if res != resource:
                    continue
                # A change that moves an object into or out of this watch's selection
                # is an ADDED or a DELETED for it, as the real server sends.
                was, now_in = old is not None and match(old), match(new)
                if type_ == "DELETED":
                    kind = "DELETED" if was else None
                elif was and now_in:
                    kind = "MODIFIED"
                else:
                    kind = "ADDED" if now_in else "DELETED" if was else None
                if kind:
                    self.send_event(kind, out(new))
            cursor = current
            if ended:
                return None
            if bookmarks and time.monotonic() >= next_bookmark:
                bookmark(cursor)
                next_bookmark = time.monotonic() + interval
        return None


class FakeApiServer:
    """The fake, driven from a test: start() it, point a client at .url (or at the
    kubeconfig write_kubeconfig() writes), change objects with put/patch/delete (watches
    see each change), then assert on requests() and events()."""

    def __init__(self, port=0, host="127.0.0.1", history_limit=1000,
                 bookmark_interval=1.0, log_path=None, watch_timeout=1800.0):
        self.host, self.port = host, port
        self.store = Store(history_limit)
        self.bookmark_interval, self.watch_timeout = bookmark_interval, watch_timeout
        self.log_path = log_path
        self._log, self._log_lock, self._httpd = [], threading.Lock(), None
        for ns in ("default", "kube-system"):  # the namespaces every cluster has
            self.store.create("namespaces", None, {"metadata": {"name": ns}})

    # ---- lifecycle ----

    def start(self):
        httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # watch threads end by themselves; do not wait
        httpd.fake = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        # A short poll interval: stop() returns within it.
        threading.Thread(target=httpd.serve_forever, args=(0.05,), name="fake-apiserver",
                         daemon=True).start()
        return self

    def stop(self):
        with self.store.cond:
            self.store.stopping = True
            self.store.cond.notify_all()
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    @property
    def url(self):
        return f"http://{self.address}"

    def write_kubeconfig(self, path, namespace="default", token=None, skip_tls_verify=False):
        """A kubeconfig for this server (plain http; kubectl, kube-rs and the Python
        client all take one). No credentials unless a dummy token is asked for.
        skip_tls_verify: the JavaScript client refuses http without it."""
        user = f"\n    token: {token}" if token else " {}"
        skip = "\n    insecure-skip-tls-verify: true" if skip_tls_verify else ""
        with open(path, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {self.url}{skip}
users:
- name: fake
  user:{user}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: {namespace}
current-context: fake
""")
        return path

    # ---- driving the objects (watches see each change) ----

    @property
    def resource_version(self):
        return str(self.store.rv)

    def put(self, obj):
        """Create the object, or replace the one of that name (no resourceVersion check);
        its namespace is created when missing. Returns the stored object."""
        resource = resource_of(obj.get("kind", ""))
        if resource == "events" and obj.get("apiVersion") == "events.k8s.io/v1":
            obj = m.event_to_core(obj)
        meta = obj.get("metadata") or {}
        ns = None if resource == "namespaces" else meta.get("namespace") or "default"
        with self.store.cond:
            if (ns, meta.get("name")) in self.store.objects[resource]:
                obj = copy.deepcopy(obj)
                obj["metadata"].pop("resourceVersion", None)
                return copy.deepcopy(self.store.replace(resource, ns, meta["name"], obj))
            return copy.deepcopy(self.store.create(resource, ns, obj, auto_namespace=True))

    def get(self, kind, ns, name):
        return copy.deepcopy(self.store.get(resource_of(kind), ns, name))

    def list(self, kind, namespace=None):
        resource = resource_of(kind)
        with self.store.cond:
            return [copy.deepcopy(o) for (ns, _), o in sorted(
                self.store.objects[resource].items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
                if namespace is None or ns == namespace]

    def patch(self, kind, ns, name, patch, content_type="application/merge-patch+json"):
        return copy.deepcopy(self.store.patch("v1", resource_of(kind), ns, name,
                                              content_type, patch))

    def patch_annotations(self, kind, ns, name, annotations):
        """Merge annotations in; a value of None removes that annotation."""
        return self.patch(kind, ns, name, {"metadata": {"annotations": annotations}})

    def patch_labels(self, kind, ns, name, labels):
        return self.patch(kind, ns, name, {"metadata": {"labels": labels}})

    def delete(self, kind, ns, name):
        return copy.deepcopy(self.store.delete(resource_of(kind), ns, name))

    def compact(self):
        """As etcd compaction: watches starting from an older resourceVersion, and
        continue tokens from before now, get 410 Expired (clients must list again).
        Running watches go on, as on a real server."""
        self.store.compact()

    def end_watches(self):
        """End every running watch cleanly, as a server does at timeoutSeconds or when
        it restarts: clients watch again from the last resourceVersion they saw."""
        self.store.end_watches(expire=False)

    def expire_watches(self):
        """compact(), then end every running watch with the 410 ERROR event: what a
        client sees when its watch drops and the history it would resume from is gone
        (so it must relist; kube-rs's watcher does). Deterministic, unlike a race."""
        self.compact()
        self.store.end_watches(expire=True)

    def events(self, api="events.k8s.io/v1", namespace=None):
        """The stored Events (posted through either group), as `api` shows them."""
        return [view(api, "events", e) for e in self.list("events", namespace)]

    # ---- the request log ----

    def _record_start(self, rec):
        with self._log_lock:
            self._log.append(rec)

    def _record_end(self, rec):
        """The file gets each request once it is answered (with its status)."""
        if self.log_path:
            with self._log_lock, open(self.log_path, "a") as f:
                f.write(m.dumps(rec) + "\n")

    def requests(self, **match):
        """Logged requests, optionally only those whose fields equal the given values,
        e.g. requests(verb="watch", resource="pods")."""
        with self._log_lock:
            return [copy.deepcopy(r) for r in self._log
                    if all(r.get(k) == v for k, v in match.items())]

    def clear_requests(self):
        with self._log_lock:
            self._log.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--seed", help="JSON file: a list of objects, or a List with items")
    ap.add_argument("--log", help="append every request to this file as a JSON line")
    ap.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    ap.add_argument("--history-limit", type=int, default=1000,
                    help="changes kept for watches; older resourceVersions get 410")
    ap.add_argument("--bookmark-interval", type=float, default=1.0)
    args = ap.parse_args(argv)
    api = FakeApiServer(args.port, args.host, args.history_limit,
                        args.bookmark_interval, args.log)
    if args.seed:
        with open(args.seed) as f:
            seed = json.load(f)
        for obj in seed.get("items", []) if isinstance(seed, dict) else seed:
            api.put(obj)
    api.start()
    if args.kubeconfig:
        api.write_kubeconfig(args.kubeconfig)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"fake-apiserver listening on {api.url}", flush=True)
    done.wait()
    api.stop()


if __name__ == "__main__":
    main()
