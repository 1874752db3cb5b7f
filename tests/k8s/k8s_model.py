"""The Kubernetes API's data rules that fake_apiserver.py serves: which resources exist
(with their discovery entries), label and field selectors, the three patch formats, the
two views of one Event (core/v1 and events.k8s.io/v1), the Status errors, and the
server-side printing (meta.k8s.io/v1 Table) that kubectl asks for.

Kept apart from the HTTP side so that each can be read on its own; stdlib only."""

import copy
import datetime
import json
import re

# resource -> its discovery entry. The verbs are the ones the fake implements (a real
# server also lists deletecollection), so a client that needs more fails loudly here.
RW_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
RESOURCES = {
    ("v1", "pods"): {"name": "pods", "singularName": "pod", "namespaced": True,
                     "kind": "Pod", "verbs": RW_VERBS, "shortNames": ["po"],
                     "categories": ["all"]},
    ("v1", "configmaps"): {"name": "configmaps", "singularName": "configmap",
                           "namespaced": True, "kind": "ConfigMap", "verbs": RW_VERBS,
                           "shortNames": ["cm"]},
    ("v1", "namespaces"): {"name": "namespaces", "singularName": "namespace",
                           "namespaced": False, "kind": "Namespace",
                           "verbs": ["get", "list", "watch"], "shortNames": ["ns"]},
    ("v1", "events"): {"name": "events", "singularName": "event", "namespaced": True,
                       "kind": "Event", "verbs": RW_VERBS, "shortNames": ["ev"]},
    ("events.k8s.io/v1", "events"): {"name": "events", "singularName": "event",
                                     "namespaced": True, "kind": "Event",
                                     "verbs": RW_VERBS, "shortNames": ["ev"]},
}
# Anything a caller may call a kind (put(), patch_annotations(), seed files) -> resource.
KIND_ALIASES = {}
for (_gv, _res), _entry in RESOURCES.items():
    for _alias in [_res, _entry["singularName"], _entry["kind"]] + _entry["shortNames"]:
        KIND_ALIASES[_alias.lower()] = _res

# Field labels each resource accepts, as the real server's field-label conversion does;
# any other field is a 400 there, so it is here too (an agent using one would break).
FIELDS = {
    "pods": {"spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
             "spec.serviceAccountName", "spec.hostNetwork", "status.phase",
             "status.podIP", "status.nominatedNodeName"},
    "configmaps": set(),
    "namespaces": {"status.phase"},
    "events": {"involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
               "involvedObject.uid", "involvedObject.apiVersion",
               "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
               "reportingComponent", "source", "type"},
}
# events.k8s.io/v1 names the same fields after its own spelling.
EVENTS_V1_FIELDS = {"regarding.kind": "involvedObject.kind",
                    "regarding.namespace": "involvedObject.namespace",
                    "regarding.name": "involvedObject.name",
                    "regarding.uid": "involvedObject.uid",
                    "regarding.apiVersion": "involvedObject.apiVersion",
                    "regarding.resourceVersion": "involvedObject.resourceVersion",
                    "regarding.fieldPath": "involvedObject.fieldPath",
                    "reportingController": "reportingComponent",
                    "reason": "reason", "type": "type"}


class ApiError(Exception):
    """A failure answered as a meta/v1 Status, the shape every client decodes."""

    def __init__(self, code, reason, message, details=None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self):
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": self.message, "reason": self.reason,
                "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def not_found(resource, name):
    return ApiError(404, "NotFound", f'{resource} "{name}" not found',
                    {"name": name, "kind": resource})


def now_time():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- label selectors (k8s.io/apimachinery/pkg/labels grammar, without > and <) ----

_LABEL_RE = re.compile(
    r"^\s*(?P<not>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*"
    r"(?:(?P<op>==|=|!=|\s+in\s+|\s+notin\s+)\s*(?P<val>\([^)]*\)|[A-Za-z0-9._-]*))?\s*$")


def _split_top(text):
    """Split on commas outside parentheses: `a in (x,y),b` is two requirements."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p for p in parts if p.strip()]


def parse_label_selector(text):
    """A list of (key, op, values); op is one of = != in notin exists !exists."""
    reqs = []
    for part in _split_top(text or ""):
        m = _LABEL_RE.match(part)
        if not m or (m["not"] and m["op"]):
            raise ApiError(400, "BadRequest",
                           f"unable to parse requirement: invalid label selector: {part!r}")
        key, op, val = m["key"], (m["op"] or "").strip(), m["val"]
        if m["not"]:
            reqs.append((key, "!exists", []))
        elif not op:
            reqs.append((key, "exists", []))
        elif op in ("in", "notin"):
            if not val or not val.startswith("("):
                raise ApiError(400, "BadRequest", f"invalid label selector: {part!r}")
            vals = [v.strip() for v in val[1:-1].split(",") if v.strip()]
            reqs.append((key, op, vals))
        else:
            reqs.append((key, "!=" if op == "!=" else "=", [val or ""]))
    return reqs


def labels_match(reqs, obj):
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, vals in reqs:
        have = key in labels
        if op == "exists" and not have or op == "!exists" and have:
            return False
        if op in ("=", "in") and (not have or labels[key] not in vals):
            return False
        # != and notin match objects without the label, as in the real server.
        if op in ("!=", "notin") and have and labels[key] in vals:
            return False
    return True


# ---- field selectors ----

def parse_field_selector(text, resource, group_version):
    reqs = []
    for part in [p for p in (text or "").split(",") if p.strip()]:
        m = re.match(r"^\s*([A-Za-z.]+)\s*(==|!=|=)\s*(.*?)\s*$", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
        field, op, value = m.groups()
        if group_version == "events.k8s.io/v1" and field in EVENTS_V1_FIELDS:
            field = EVENTS_V1_FIELDS[field]  # filtered on the stored core/v1 form
        elif group_version == "events.k8s.io/v1" and not field.startswith("metadata."):
            field = "(unsupported)" + field
        if field not in {"metadata.name", "metadata.namespace"} | FIELDS[resource]:
            raise ApiError(400, "BadRequest",
                           f'field label not supported: {field.split(")")[-1]}')
        reqs.append((field, op != "!=", value))
    return reqs


def field_value(obj, field):
    cur = obj
    for part in field.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if field == "source" and isinstance(obj.get("source"), dict):
        cur = obj["source"].get("component")
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return "" if cur is None else str(cur)


def fields_match(reqs, obj):
    return all((field_value(obj, f) == v) == eq for f, eq, v in reqs)


# ---- patches ----

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        # Strategic-merge directives ($patch, $retainKeys, $setElementOrder/...) have no
        # meaning in a merge patch; kubectl may send them, the fake drops them.
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _pointer(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, parts):
    for p in parts:
        doc = doc[int(p)] if isinstance(doc, list) else doc[p]
    return doc


def json_patch(target, ops):
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(target)
    if not isinstance(ops, list):
        raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
    try:
        for op in ops:
            kind, parts = op["op"], _pointer(op["path"])
            if kind in ("move", "copy"):
                src = _pointer(op["from"])
                value = copy.deepcopy(_walk(doc, src))
                if kind == "move":
                    parent = _walk(doc, src[:-1])
                    del parent[int(src[-1]) if isinstance(parent, list) else src[-1]]
                kind, op = "add", {"value": value}
            if kind == "test":
                if _walk(doc, parts) != op["value"]:
                    raise ApiError(422, "Invalid", f"test operation failed at {op!r}")
                continue
            if not parts:
                doc = copy.deepcopy(op["value"])
                continue
            parent, last = _walk(doc, parts[:-1]), parts[-1]
            if kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op["value"])
                else:
                    parent[last]  # must exist: replace of a missing key fails
                    parent[last] = copy.deepcopy(op["value"])
            elif kind == "add":
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    parent.insert(index, copy.deepcopy(op["value"]))
                else:
                    parent[last] = copy.deepcopy(op["value"])
            else:
                raise ApiError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ApiError(422, "Invalid", f"the JSON patch could not be applied: {exc!r}")
    return doc


PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json",
               "application/json-patch+json")


def apply_patch(target, content_type, body):
    if content_type == "application/json-patch+json":
        return json_patch(target, body)
    if content_type in PATCH_TYPES:
        return merge_patch(target, body)
    raise ApiError(415, "UnsupportedMediaType",
                   f"the body of the request was in an unknown format - accepted media "
                   f"types include: {', '.join(PATCH_TYPES)}")


# ---- Events: stored once as core/v1, also seen as events.k8s.io/v1 ----

# core/v1 name -> events.k8s.io/v1 name (the real server's conversion).
EVENT_RENAMES = {"involvedObject": "regarding", "message": "note",
                 "reportingComponent": "reportingController", "source": "deprecatedSource",
                 "firstTimestamp": "deprecatedFirstTimestamp",
                 "lastTimestamp": "deprecatedLastTimestamp", "count": "deprecatedCount"}


def event_to_v1(core):
    out = {EVENT_RENAMES.get(k, k): copy.deepcopy(v) for k, v in core.items()}
    out["apiVersion"], out["kind"] = "events.k8s.io/v1", "Event"
    return out


def event_to_core(ev1):
    back = {v: k for k, v in EVENT_RENAMES.items()}
    out = {back.get(k, k): copy.deepcopy(v) for k, v in ev1.items()}
    out["apiVersion"], out["kind"] = "v1", "Event"
    # core/v1 always has one (typed clients such as k8s-openapi require the field).
    out.setdefault("involvedObject", {})
    return out


def validate(resource, obj):
    """The few create/update checks whose absence would let a test feed clients objects
    no real server stores (k8s-openapi, for one, cannot decode a Pod without containers)."""
    name = (obj.get("metadata") or {}).get("name", "")
    if resource == "pods":
        containers = (obj.get("spec") or {}).get("containers")
        if not containers or not all(c.get("name") and c.get("image") for c in containers):
            raise ApiError(422, "Invalid", f'Pod "{name}" is invalid: spec.containers: '
                           "Required value (each with a name and an image)",
                           {"name": name, "kind": "Pod"})
    if resource == "events" and not isinstance(obj.get("involvedObject"), dict):
        raise ApiError(422, "Invalid", f'Event "{name}" is invalid: involvedObject: '
                       "Required value", {"name": name, "kind": "Event"})


def validate_event_v1(ev):
    """The checks events.k8s.io/v1 makes on a new Event (a real server answers 422)."""
    missing = [f for f in ("eventTime", "reportingController", "reportingInstance",
                           "action", "reason") if not ev.get(f)]
    if ev.get("type") not in ("Normal", "Warning"):
        missing.append("type (Normal or Warning)")
    if missing:
        name = (ev.get("metadata") or {}).get("name", "")
        raise ApiError(422, "Invalid", f'Event.events.k8s.io "{name}" is invalid: '
                       f"required: {', '.join(missing)}",
                       {"name": name, "group": "events.k8s.io", "kind": "Event"})


# ---- discovery ----

def version_doc():
    return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake",
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.23.0", "compiler": "gc", "platform": "linux/amd64"}


def api_versions_doc(address):
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                            "serverAddress": address}]}


def api_group_list_doc():
    gv = {"groupVersion": "events.k8s.io/v1", "version": "v1"}
    return {"kind": "APIGroupList", "apiVersion": "v1",
            "groups": [{"name": "events.k8s.io", "versions": [gv], "preferredVersion": gv}]}


def api_group_doc():
    return api_group_list_doc()["groups"][0] | {"kind": "APIGroup", "apiVersion": "v1"}


def resource_list_doc(group_version):
    return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
            "resources": [e for (gv, _), e in RESOURCES.items() if gv == group_version]}


# ---- server-side printing: the meta.k8s.io/v1 Table kubectl asks for ----

def _age(stamp):
    """The short age kubectl shows (90s, 5m, 3h, 2d)."""
    if not stamp:
        return "<unknown>"
    then = datetime.datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc)
    secs = int((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
    if secs < 120:
        return f"{max(secs, 0)}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h" if secs < 172800 else f"{secs // 86400}d"


def _col(name, typ="string", fmt="", priority=0):
    return {"name": name, "type": typ, "format": fmt, "description": name, "priority": priority}


def _pod_row(p):
    spec, status = p.get("spec") or {}, p.get("status") or {}
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount") or 0) for s in statuses)
    return [p["metadata"]["name"], f"{ready}/{len(spec.get('containers') or [])}",
            status.get("reason") or status.get("phase") or "Unknown", restarts,
            _age(p["metadata"].get("creationTimestamp")), status.get("podIP") or "<none>",
            spec.get("nodeName") or "<none>"]


def _event_row(e):
    inv = e.get("involvedObject") or e.get("regarding") or {}
    last = (e.get("lastTimestamp") or e.get("deprecatedLastTimestamp")
            or (e.get("series") or {}).get("lastObservedTime") or e.get("eventTime"))
    return [_age(last), e.get("type", ""), e.get("reason", ""),
            f"{(inv.get('kind') or '').lower()}/{inv.get('name', '')}",
            e.get("message") or e.get("note") or ""]


TABLES = {
    "pods": ([_col("Name", fmt="name"), _col("Ready"), _col("Status"),
              _col("Restarts", "integer"), _col("Age"), _col("IP", priority=1),
              _col("Node", priority=1)], _pod_row),
    "configmaps": ([_col("Name", fmt="name"), _col("Data", "integer"), _col("Age")],
                   lambda c: [c["metadata"]["name"],
                              len(c.get("data") or {}) + len(c.get("binaryData") or {}),
                              _age(c["metadata"].get("creationTimestamp"))]),
    "namespaces": ([_col("Name", fmt="name"), _col("Status"), _col("Age")],
                   lambda n: [n["metadata"]["name"],
                              (n.get("status") or {}).get("phase", "Active"),
                              _age(n["metadata"].get("creationTimestamp"))]),
    "events": ([_col("Last Seen"), _col("Type"), _col("Reason"), _col("Object"),
                _col("Message")], _event_row),
}


def wants_table(accept):
    return "as=Table" in (accept or "")


def wants_metadata(accept):
    """kube-rs's metadata_watcher and get_metadata ask for metadata only."""
    return "as=PartialObjectMetadata" in (accept or "") and not wants_table(accept)


def partial(obj):
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": copy.deepcopy(obj["metadata"])}


def to_table(resource, objects, resource_version, with_columns=True):
    """A Table of the objects; each row carries the object's metadata, as the default
    includeObject=Metadata asks."""
    columns, row = TABLES[resource]
    rows = [{"cells": row(o), "object": partial(o)} for o in objects]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
            "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns if with_columns else [], "rows": rows}


def dumps(obj):
    return json.dumps(obj, separators=(",", ":"))
