"""The fake API server's state: the stored objects, the one global resourceVersion
counter, the bounded history of changes that watches replay (and its compaction), and
the list snapshots behind continue tokens. fake_apiserver.py serves it over HTTP."""

import base64
import collections
import copy
import json
import random
import threading
import uuid

import k8s_model as m

STORED = ("pods", "configmaps", "namespaces", "events")


def resource_of(kind):
    try:
        return m.KIND_ALIASES[kind.lower()]
    except KeyError:
        raise ValueError(f"the fake serves no kind {kind!r}") from None


def view(gv, resource, obj):
    """The object as the group version asked for shows it (Events differ by group)."""
    if resource == "events" and gv == "events.k8s.io/v1":
        return m.event_to_v1(obj)
    return obj


def unview(gv, resource, obj):
    if resource == "events" and gv == "events.k8s.io/v1":
        return m.event_to_core(obj)
    return obj


def kind_of(resource):
    return m.RESOURCES[("v1", resource)]["kind"]


class Expired(Exception):
    pass


class Store:
    """The objects, one global resourceVersion counter, and the bounded history of
    changes that watches replay. Objects are never mutated in place (each write stores
    a new dict), so lists and snapshots can hold references without copying."""

    def __init__(self, history_limit):
        self.cond = threading.Condition()
        self.rv = 0
        self.objects = {r: {} for r in STORED}
        # (rv, resource, type, new object, previous object), the newest history_limit
        # changes: those above `evicted`. A new watch may start from rv >= floor (which
        # compaction raises); a running one is lost once it falls behind `evicted`.
        self.history = collections.deque()
        self.history_limit = history_limit
        self.floor = self.evicted = 0
        # Bumped to end every running watch: cleanly ("end") or with a 410 ("expire").
        self.generation = {"end": 0, "expire": 0}
        self.snapshots = collections.OrderedDict()  # continue-token id -> (rv, items)
        self.stopping = False

    def _commit(self, resource, type_, obj, old):
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if type_ == "DELETED":
            self.objects[resource].pop(key, None)
        else:
            self.objects[resource][key] = obj
        self.history.append((self.rv, resource, type_, obj, old))
        while len(self.history) > self.history_limit:
            self.evicted = self.history.popleft()[0]
            self.floor = max(self.floor, self.evicted)
        self.cond.notify_all()
        return obj

    def get(self, resource, ns, name):
        obj = self.objects[resource].get((ns if resource != "namespaces" else None, name))
        if obj is None:
            raise m.not_found(resource, name)
        return obj

    def create(self, resource, ns, obj, *, auto_namespace=False):
        with self.cond:
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                # The real suffix alphabet: no vowels, so no words get spelled.
                meta["name"] = meta["generateName"] + "".join(
                    random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
            if not meta.get("name"):
                raise m.ApiError(422, "Invalid", f"{kind_of(resource)} is invalid: "
                                 "metadata.name: Required value: name or generateName "
                                 "is required")
            if resource == "namespaces":
                meta.pop("namespace", None)
                obj.setdefault("spec", {"finalizers": ["kubernetes"]})
                obj.setdefault("status", {"phase": "Active"})
            else:
                if meta.get("namespace") not in (None, "", ns):
                    raise m.ApiError(400, "BadRequest", "the namespace of the provided "
                                     "object does not match the namespace sent on the "
                                     "request")
                meta["namespace"] = ns
                if (None, ns) not in self.objects["namespaces"]:
                    if not auto_namespace:
                        raise m.not_found("namespaces", ns)
                    self.create("namespaces", None, {"metadata": {"name": ns}})
            if (meta.get("namespace"), meta["name"]) in self.objects[resource]:
                raise m.ApiError(409, "AlreadyExists",
                                 f'{resource} "{meta["name"]}" already exists',
                                 {"name": meta["name"], "kind": resource})
            m.validate(resource, obj)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = m.now_time()
            obj["apiVersion"], obj["kind"] = "v1", kind_of(resource)
            if resource == "pods":
                obj.setdefault("status", {"phase": "Pending"})
            return self._commit(resource, "ADDED", obj, None)

    def _changed(self, resource, old, new, check_rv):
        """Checks a write against the stored object; None when it changes nothing (a
        real server bumps no resourceVersion and sends no watch event then)."""
        name = old["metadata"]["name"]
        sent_rv = (new.get("metadata") or {}).get("resourceVersion")
        if check_rv and sent_rv and sent_rv != old["metadata"]["resourceVersion"]:
            raise m.ApiError(409, "Conflict", f'Operation cannot be fulfilled on '
                             f'{resource} "{name}": the object has been modified; please '
                             'apply your changes to the latest version and try again',
                             {"name": name, "kind": resource})
        new = copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        for field in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        m.validate(resource, new)
        return None if new == old else new

    def replace(self, resource, ns, name, obj):
        with self.cond:
            old = self.get(resource, ns, name)
            sent = (obj.get("metadata") or {}).get("name")
            if sent != name:
                raise m.ApiError(400, "BadRequest", f"the name of the object ({sent}) "
                                 f"does not match the name on the URL ({name})")
            new = self._changed(resource, old, obj, check_rv=True)
            return old if new is None else self._commit(resource, "MODIFIED", new, old)

    def patch(self, gv, resource, ns, name, content_type, body):
        with self.cond:
            old = self.get(resource, ns, name)
            patched = m.apply_patch(view(gv, resource, old), content_type, body)
            new = self._changed(resource, old, unview(gv, resource, patched), check_rv=True)
            return old if new is None else self._commit(resource, "MODIFIED", new, old)

    def delete(self, resource, ns, name):
        with self.cond:
            old = self.get(resource, ns, name)
            return self._commit(resource, "DELETED", old, old)

    def compact(self):
        """As etcd compaction: new watches from an older resourceVersion and continue
        tokens get 410; running watches go on (the real server's watch cache feeds them)."""
        with self.cond:
            self.floor = self.rv
            self.snapshots.clear()

    def end_watches(self, expire):
        with self.cond:
            self.generation["expire" if expire else "end"] += 1
            self.cond.notify_all()

    def list(self, resource, match, limit, token):
        with self.cond:
            if token:
                try:
                    state = json.loads(base64.urlsafe_b64decode(token))
                    rv, items = self.snapshots[state["id"]]
                    start = int(state["start"])
                except (ValueError, KeyError, TypeError):
                    raise m.ApiError(410, "Expired", "The provided continue parameter is "
                                     "too old to display a consistent list result. You "
                                     "can start a new list without the continue "
                                     "parameter.") from None
            else:
                rv = str(self.rv)
                items = [o for _, o in sorted(self.objects[resource].items(),
                                              key=lambda kv: (kv[0][0] or "", kv[0][1]))
                         if match(o)]
                start = 0
            page, more = items[start:], ""
            if limit and len(page) > limit:
                # Later pages come from this same snapshot: consistent, as etcd's are.
                snap = state["id"] if token else uuid.uuid4().hex
                self.snapshots[snap] = (rv, items)
                while len(self.snapshots) > 100:
                    self.snapshots.popitem(last=False)
                more = base64.urlsafe_b64encode(m.dumps(
                    {"rv": rv, "id": snap, "start": start + limit}).encode()).decode()
                page = page[:limit]
            return rv, page, more, len(items) - start - len(page)

    def watch_start(self, resource, rv_param, initial_events):
        """(cursor, objects to send first as ADDED, generation mark). A watch without a
        resourceVersion (or 0) starts with the current state, as the real server's does."""
        with self.cond:
            mark = dict(self.generation)
            if rv_param in ("", "0") or initial_events:
                objs = [o for _, o in sorted(self.objects[resource].items(),
                                             key=lambda kv: (kv[0][0] or "", kv[0][1]))]
                return self.rv, objs, mark
            try:
                cursor = int(rv_param)
            except ValueError:
                raise m.ApiError(400, "BadRequest", f"invalid resource version {rv_param!r}")
            if cursor < self.floor:
                raise Expired(f"too old resource version: {cursor} ({self.floor})")
            return cursor, [], mark

    def wait_events(self, cursor, timeout, mark):
        """(the changes after the cursor, waiting up to timeout for one; the current
        resourceVersion; whether end_watches ended this watch). Expired when the
        changes have left the history or end_watches expired this watch."""
        with self.cond:
            if self.rv <= cursor and not self.stopping and mark == self.generation:
                self.cond.wait(timeout)
            if cursor < self.evicted or mark["expire"] != self.generation["expire"]:
                raise Expired(f"too old resource version: {cursor} ({self.floor})")
            new = []
            for entry in reversed(self.history):
                if entry[0] <= cursor:
                    break
                new.append(entry)
            return new[::-1], self.rv, mark["end"] != self.generation["end"]
