"""A contract-faithful double of Consul's HTTP API, for tests: no Consul server can be installed here.

A real HTTP server on loopback holding Consul-shaped state: one rising index; services registered through the agent
API with TTL checks (critical after their TTL, deregistered after ``DeregisterCriticalServiceAfter``); KV with
``ModifyIndex`` compare-and-set; blocking queries (``index`` + ``wait``, answered when the index passes it or after
``wait`` plus up to wait/16 of jitter) with ``X-Consul-Index``; ACL tokens (writes refused with 403, reads
*silently filtered* with ``X-Consul-Results-Filtered-By-ACLs``); and switchable faults: 500 "No cluster leader",
the index going backwards, hangs, and the agent going down.

Behaviour follows Consul's documentation of the HTTP API and blocking queries; the opt-in suite runs the same
tests against a real agent when CONSUL_HTTP_ADDR is set.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


def _ci(d: dict[str, Any], key: str, default: Any = None) -> Any:
    """Consul decodes JSON keys case-insensitively."""
    for k, v in d.items():
        if k.lower() == key.lower():
            return v
    return default


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


class ConsulDouble:
    def __init__(self) -> None:
        self.index = 10
        self.cond = threading.Condition()
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.kv: dict[str, dict[str, Any]] = {}
        #: Deleted keys and the index of their deletion (Consul keeps tombstones so a prefix's index never drops).
        self.tombstones: dict[str, int] = {}
        self.node = {"Node": "double", "Address": "127.0.0.1", "Datacenter": "dc1"}
        self.fault: str | None = None  # "leader" | "hang" | "429" | "503"
        self.unknown_check_status = 404  # older agents answer 500
        self.acl: dict[str, dict[str, Any]] | None = None  # token -> {"service_read", "service_write", "key_write"}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        #: Every service definition registered, as the client sent it (to pin the request shape).
        self.registrations: list[dict[str, Any]] = []
        #: Service ids removed by DeregisterCriticalServiceAfter.
        self.deregistered_critical: list[str] = []
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, port: int | None = None) -> None:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                double._connections.add(self.connection)

            def finish(self) -> None:
                double._connections.discard(self.connection)
                super().finish()

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query, keep_blank_values=True)
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                token = self.headers.get("X-Consul-Token") or (query.get("token") or [""])[0]
                double.requests.append((method, url.path, query))
                status, headers, payload = double.handle(method, url.path, query, body, token)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PUT(self) -> None:
                self._handle("PUT")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that died mid-query: Consul's shrug
                    super().handle_error(request, client_address)

        self.server = Server(("127.0.0.1", port or self.port or 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self._stop.clear()
        threading.Thread(target=self._ttl_loop, daemon=True).start()

    def stop(self) -> None:
        """The agent goes down: open connections are cut (keep-alive ones too) and new ones refused until
        ``start()``."""
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._connections.clear()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def bump(self) -> None:
        with self.cond:
            self.index += 1
            self.cond.notify_all()

    def reset_index(self, to: int = 2) -> None:
        """A snapshot restore or a new cluster: the index goes backwards."""
        with self.cond:
            self.index = to
            for item in self.kv.values():
                item["ModifyIndex"] = min(item["ModifyIndex"], to)
                item["CreateIndex"] = min(item["CreateIndex"], to)
            self.tombstones = {k: min(i, to) for k, i in self.tombstones.items()}
            self.cond.notify_all()

    def requests_to(self, prefix: str) -> int:
        return sum(1 for _, path, _ in self.requests if path.startswith(prefix))

    # -- health checks ---------------------------------------------------------------------------------

    def _ttl_loop(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            changed = False
            with self.cond:
                for check_id, check in list(self.checks.items()):
                    if check_id not in self.checks:  # dropped with its service earlier in this pass
                        continue
                    if check["Status"] != "critical" and check["ttl"] and now > check["expires"]:
                        check["Status"] = "critical"
                        check["critical_since"] = now
                        changed = True
                    after = check.get("deregister_after")
                    if check["Status"] == "critical" and after and now - check["critical_since"] > after:
                        self.services.pop(check["ServiceID"], None)
                        self._drop_checks(check["ServiceID"])
                        self.deregistered_critical.append(check["ServiceID"])
                        changed = True
                if changed:
                    self.index += 1
                    self.cond.notify_all()

    def check_status(self, service_id: str) -> str | None:
        check = self.checks.get(f"service:{service_id}")
        return None if check is None else str(check["Status"])

    def set_check(self, service_id: str, status: str) -> None:
        with self.cond:
            check = self.checks[f"service:{service_id}"]
            check["Status"] = status
            check["critical_since"] = time.monotonic()
            check["expires"] = time.monotonic() + (check["ttl"] or 3600)
            self.index += 1
            self.cond.notify_all()

    # -- ACL -------------------------------------------------------------------------------------------

    def _may(self, token: str, what: str, name: str) -> bool:
        if self.acl is None:
            return True
        rules = self.acl.get(token)
        if rules is None:
            return False
        allowed = rules.get(what, ())
        return "*" in allowed or any(name.startswith(p) for p in allowed)

    # -- the API ---------------------------------------------------------------------------------------

    def _block(self, query: dict[str, list[str]]) -> None:
        if "index" not in query:
            return
        try:
            wanted = int(query["index"][0])
        except ValueError:
            return
        wait = _duration(query.get("wait", ["300s"])[0])
        deadline = time.monotonic() + wait + random.random() * wait / 16
        with self.cond:
            while self.index <= wanted:  # as Consul: an index that went backwards is only seen after the wait
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes, token: str):
        if self.fault == "hang":  # a hung agent: nothing answers until the fault is cleared
            deadline = time.monotonic() + 600
            while self.fault == "hang" and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.fault == "leader":
            return 500, {}, b"No cluster leader"
        if self.fault == "429":
            return 429, {}, b"rate limit exceeded"
        if self.fault == "503":
            return 503, {}, b"Service Unavailable"
        if path.startswith("/v1/health/checks/"):
            name = path.rsplit("/", 1)[1]
            with self.cond:
                ids = [svc["ID"] for svc in self.services.values() if svc["Service"] == name]
                listed = [c for service_id in ids for c in self._checks_of(service_id)]
                return 200, {"X-Consul-Index": str(self.index)}, listed
        if path.startswith("/v1/health/service/"):
            return self._health(path.rsplit("/", 1)[1], query, token)
        if path == "/v1/agent/service/register" and method == "PUT":
            return self._register(json.loads(body or b"{}"), token)
        if path.startswith("/v1/agent/service/deregister/") and method == "PUT":
            service_id = path.rsplit("/", 1)[1]
            svc = self.services.get(service_id)
            if svc is not None and not self._may(token, "service_write", svc["Service"]):
                return 403, {}, b"Permission denied"
            with self.cond:
                self.services.pop(service_id, None)
                self._drop_checks(service_id)
                self.index += 1
                self.cond.notify_all()
            return 200, {}, b""
        if path.startswith("/v1/agent/check/pass/") and method == "PUT":
            check_id = path[len("/v1/agent/check/pass/") :]
            check = self.checks.get(check_id)
            if check is None:
                return self.unknown_check_status, {}, f'Unknown check ID "{check_id}"'.encode()
            with self.cond:
                was = check["Status"]
                check["Status"] = "passing"
                check["expires"] = time.monotonic() + (check["ttl"] or 3600)
                if was != "passing":
                    self.index += 1
                    self.cond.notify_all()
            return 200, {}, b""
        if path.startswith(("/v1/agent/check/fail/", "/v1/agent/check/warn/")) and method == "PUT":
            check_id = path.split("/", 5)[5]
            check = self.checks.get(check_id)
            if check is None:
                return self.unknown_check_status, {}, f'Unknown check ID "{check_id}"'.encode()
            with self.cond:
                check["Status"] = "critical" if "/fail/" in path else "warning"
                check["critical_since"] = time.monotonic()
                check["expires"] = time.monotonic() + (check["ttl"] or 3600)
                self.index += 1
                self.cond.notify_all()
            return 200, {}, b""
        if path.startswith("/v1/kv/"):
            return self._kv(method, path[len("/v1/kv/") :], query, body, token)
        if path == "/v1/status/leader":
            return 200, {}, b'"127.0.0.1:8300"'
        return 404, {}, b"not found"

    def _health(self, name: str, query: dict[str, list[str]], token: str):
        self._block(query)
        with self.cond:
            index = self.index
            entries = []
            for svc in self.services.values():
                if svc["Service"] != name:
                    continue
                checks = self._checks_of(svc["ID"])
                if "passing" in query and any(c["Status"] != "passing" for c in checks):
                    continue
                entries.append({"Node": dict(self.node), "Service": dict(svc), "Checks": checks})
        headers = {"X-Consul-Index": str(index), "X-Consul-KnownLeader": "true"}
        if not self._may(token, "service_read", name):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
            entries = []
        return 200, headers, entries

    def _register(self, definition: dict[str, Any], token: str):
        name = _ci(definition, "Name")
        if not self._may(token, "service_write", name):
            return 403, {}, b"Permission denied: token lacks service:write"
        self.registrations.append(definition)
        service_id = _ci(definition, "ID") or name
        svc = {
            "ID": service_id,
            "Service": name,
            "Address": _ci(definition, "Address", ""),
            "Port": _ci(definition, "Port", 0),
            "Tags": _ci(definition, "Tags") or [],
            "Meta": _ci(definition, "Meta") or {},
            "Weights": _ci(definition, "Weights") or {"Passing": 1, "Warning": 1},  # Consul fills in its default
        }
        # Consul takes a single "Check" and a "Checks" list (py-consul 1.8 sends the list); their IDs are
        # "service:<id>", or "service:<id>:<n>" (from 1) when there are several, unless the check names its own.
        definitions = ([_ci(definition, "Check")] if _ci(definition, "Check") else []) + list(
            _ci(definition, "Checks") or []
        )
        with self.cond:
            self._drop_checks(service_id)
            self.services[service_id] = svc
            for n, check_def in enumerate(definitions, start=1):
                check_id = _ci(check_def, "CheckID") or _ci(check_def, "ID") or f"service:{service_id}"
                if len(definitions) > 1 and not (_ci(check_def, "CheckID") or _ci(check_def, "ID")):
                    check_id = f"service:{service_id}:{n}"
                ttl = _ci(check_def, "TTL")
                after = _ci(check_def, "DeregisterCriticalServiceAfter")
                self.checks[check_id] = {
                    "CheckID": check_id,
                    "ServiceID": service_id,
                    "ServiceName": name,
                    "Status": "critical",  # Consul starts TTL checks critical until the first pass
                    "ttl": _duration(ttl) if ttl else None,
                    "expires": time.monotonic() + (_duration(ttl) if ttl else 3600),
                    "deregister_after": _duration(after) if after else None,
                    "critical_since": time.monotonic(),
                }
            self.index += 1
            self.cond.notify_all()
        return 200, {}, b""

    def _drop_checks(self, service_id: str) -> None:
        for check_id in [k for k, c in self.checks.items() if c["ServiceID"] == service_id]:
            del self.checks[check_id]

    def _checks_of(self, service_id: str) -> list[dict[str, Any]]:
        return [
            {"CheckID": c["CheckID"], "ServiceID": service_id, "ServiceName": c["ServiceName"], "Status": c["Status"]}
            for c in self.checks.values()
            if c["ServiceID"] == service_id
        ]

    def _kv_index(self, key: str, recurse: bool) -> int:
        """As Consul: a key's (or, with recurse, a prefix's) index is the last ModifyIndex under it, deletions
        included (tombstones), so a blocking query on a prefix wakes for changes under that prefix only. A key
        that never existed has the store's index."""
        if recurse:
            found = [v["ModifyIndex"] for k, v in self.kv.items() if k.startswith(key)]
            found += [i for k, i in self.tombstones.items() if k.startswith(key)]
        elif key in self.kv:
            found = [self.kv[key]["ModifyIndex"]]
        else:
            found = [self.tombstones[key]] if key in self.tombstones else []
        return max(found) if found else self.index

    def _block_kv(self, key: str, query: dict[str, list[str]]) -> None:
        if "index" not in query:
            return
        try:
            wanted = int(query["index"][0])
        except ValueError:
            return
        wait = _duration(query.get("wait", ["300s"])[0])
        deadline = time.monotonic() + wait + random.random() * wait / 16
        with self.cond:
            while self._kv_index(key, "recurse" in query) <= wanted:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)

    def _kv(self, method: str, key: str, query: dict[str, list[str]], body: bytes, token: str):
        if method == "GET":
            self._block_kv(key, query)
            with self.cond:
                index = self._kv_index(key, "recurse" in query)
                if "recurse" in query:
                    items = [v for k, v in sorted(self.kv.items()) if k.startswith(key)]
                else:
                    items = [self.kv[key]] if key in self.kv else []
            headers = {"X-Consul-Index": str(index)}
            if not self._may(token, "key_read", key):
                headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
                items = []
            if not items:
                return 404, headers, b""
            out = []
            for item in items:
                entry = {k: v for k, v in item.items() if k != "raw"}
                entry["Value"] = base64.b64encode(item["raw"]).decode() if item["raw"] is not None else None
                out.append(entry)
            return 200, headers, out
        if not self._may(token, "key_write", key):
            return 403, {}, b"Permission denied"
        if method == "PUT":
            with self.cond:
                current = self.kv.get(key)
                if "cas" in query:
                    cas = int(query["cas"][0])
                    if (cas == 0 and current is not None) or (
                        cas != 0 and (current is None or current["ModifyIndex"] != cas)
                    ):
                        return 200, {}, b"false"
                self.index += 1
                self.kv[key] = {
                    "Key": key,
                    "raw": body,
                    "Flags": 0,
                    "LockIndex": 0,
                    "CreateIndex": current["CreateIndex"] if current else self.index,
                    "ModifyIndex": self.index,
                }
                self.cond.notify_all()
            return 200, {}, b"true"
        if method == "DELETE":
            with self.cond:
                current = self.kv.get(key)
                if "cas" in query and (current is None or current["ModifyIndex"] != int(query["cas"][0])):
                    return 200, {}, b"false"  # as Consul: a compare-and-delete that lost answers false
                gone = [k for k in self.kv if k.startswith(key)] if "recurse" in query else [key]
                self.index += 1
                for k in gone:
                    if self.kv.pop(k, None) is not None:
                        self.tombstones[k] = self.index
                self.cond.notify_all()
            return 200, {}, b"true"
        return 405, {}, b""
