"""A stand-in for Formation's account service (form-state): a real HTTP server on 127.0.0.1.

Routes and envelopes follow ../shared/FORMATION.md §2 (prefix "/v1" or ""):

- GET account/list                       → {"success", "message", "accounts", "total"}
- GET account/<address>/get              → {"success", "account"} | 404 {"success": false}
- GET instance/<id>/get          SIGNED  → {"success", "instance"} | 403 | 404
- GET instance/list              SIGNED  → {"success", "count", "instances"}
- GET instance/<build_id>/get_by_build_id → {"Success": {"List": [...]}}

Signed routes answer 401 {"error": "Missing signature"} without an `Authorization` header,
even from 127.0.0.1, and only show instances the signer owns or is authorized on unless the
signer is an admin. The signature is checked here independently of hostagent.owners.signing (same
steps as form-state: SHA-256 the message, recover from SHA-256 of that, Keccak address).

Faults on demand (`set_fault`): reset, slow, drip, http (status), garbage, success_false,
huge, wrong_types, body (raw bytes); `stop()` makes the port refuse connections, `start()`
brings it back on the same port.

Use `serve_accounts(...)` (a context manager, fine in sync and trio tests) to run one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import coincurve
from Crypto.Hash import keccak

ROUTES = ("account_list", "account_get", "instance_get", "instance_list", "by_build_id")


def account(address: str, owned: Iterable[str] = (), authorized: Mapping[str, str] | None = None,
            *, admin: bool = False, **extra: Any) -> dict[str, Any]:
    """An account object shaped like form-state's serde output."""
    doc: dict[str, Any] = {
        "address": address, "name": extra.pop("name", None), "is_global_admin": admin,
        "owned_instances": sorted(owned), "owned_agents": [], "owned_models": [],
        "authorized_instances": dict(authorized or {}), "subscription": None, "usage": None,
        "credits": 0, "hired_agents": [], "created_at": 1_700_000_000, "updated_at": 1_700_000_000,
    }
    doc.update(extra)
    return doc


def instance(instance_id: str, owner: str, *, build_id: str = "", node_id: str = "",
             status: str = "Started") -> dict[str, Any]:
    """An Instance object shaped like form-state's."""
    return {
        "instance_id": instance_id, "node_id": node_id, "build_id": build_id,
        "instance_owner": owner, "status": status, "created_at": 1_700_000_000,
        "updated_at": 1_700_000_000, "resources": {"vcpus": 2, "memory_mb": 2048,
                                                   "bandwidth_mbps": 1000, "gpu": None},
    }


def recover_signer(header: str) -> str | None:
    """form-state's check: the signer's address, or None when the header does not verify."""
    if not header.startswith("Signature "):
        return None
    parts = header[len("Signature "):].split(".")
    if len(parts) != 3:
        return None
    try:
        sig, recid, msg = bytes.fromhex(parts[0]), int(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
    if len(sig) != 64 or not 0 <= recid <= 3:
        return None
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    if int.from_bytes(sig[32:], "big") > n // 2:
        return None
    digest = hashlib.sha256(hashlib.sha256(msg).digest()).digest()
    try:
        pub = coincurve.PublicKey.from_signature_and_message(sig + bytes([recid]), digest,
                                                             hasher=None)
    except Exception:
        return None
    k = keccak.new(digest_bits=256)
    k.update(pub.format(compressed=False)[1:])
    return str(k.hexdigest()[-40:])


@dataclass
class Fault:
    """A fault the stand-in applies to `routes` (all when empty)."""

    kind: str
    routes: frozenset[str] = frozenset()
    delay_s: float = 0.0
    status: int = 503
    size_bytes: int = 0
    declare_length: bool = True
    body: bytes = b""


@dataclass
class Request:
    """One request the stand-in saw."""

    route: str
    path: str
    signer: str | None
    status: int


@dataclass
class AccountService:
    """The stand-in's state; mutate it through the methods (they take the lock)."""

    accounts: list[dict[str, Any]] = field(default_factory=list)
    instances: list[dict[str, Any]] = field(default_factory=list)
    prefix: str = "/v1"
    admins: set[str] = field(default_factory=set)
    local_bypass: bool = True
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    fault: Fault | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        """Base URL (without the prefix)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on 127.0.0.1, on the same port after a stop()."""
        service = self

        class Handler(_Handler):
            svc = service

        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Go down: close the listening socket (connections are refused) and free slow calls."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def set_fault(self, kind: str, *routes: str, **params: Any) -> None:
        """Apply a fault to the given routes (all when none given) until clear_fault()."""
        unknown = set(routes) - set(ROUTES)
        assert not unknown, unknown
        with self.lock:
            self.fault = Fault(kind, frozenset(routes), **params)

    def clear_fault(self) -> None:
        """Answer normally again."""
        with self.lock:
            self.fault = None

    def set_accounts(self, accounts: Iterable[dict[str, Any]]) -> None:
        """Replace every account (e.g. to move an instance to another owner)."""
        with self.lock:
            self.accounts = list(accounts)

    def add_account(self, acct: dict[str, Any]) -> None:
        """Add one account."""
        with self.lock:
            self.accounts.append(acct)

    def add_instance(self, inst: dict[str, Any]) -> None:
        """Add one instance record."""
        with self.lock:
            self.instances.append(inst)

    def seen(self, route: str) -> list[Request]:
        """Requests seen on one route."""
        with self.lock:
            return [r for r in self.requests if r.route == route]


class _Handler(BaseHTTPRequestHandler):
    svc: AccountService

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        svc = self.svc
        route, arg = self._route()
        with svc.lock:
            fault = svc.fault if svc.fault and (not svc.fault.routes
                                                or route in svc.fault.routes) else None
        signer = recover_signer(self.headers.get("Authorization", "")) \
            if self.headers.get("Authorization") else None
        if route is None:
            return self._send(404, {"error": "not found"}, None, signer)
        if fault is not None and self._apply(fault, route, signer):
            return None
        status, doc = self._answer(route, arg, signer)
        if fault is not None and fault.kind == "drip" and status == 200:
            return self._drip(route, doc, fault, signer)
        return self._send(status, doc, route, signer)

    def _route(self) -> tuple[str | None, str]:
        path = self.path.split("?", 1)[0]
        prefix = self.svc.prefix.rstrip("/")
        if prefix:
            if not path.startswith(prefix + "/"):
                return None, ""
            path = path[len(prefix):]
        parts = [unquote(p) for p in path.strip("/").split("/")]
        match parts:
            case ["account", "list"]:
                return "account_list", ""
            case ["account", addr, "get"]:
                return "account_get", addr
            case ["instance", "list"]:
                return "instance_list", ""
            case ["instance", iid, "get"]:
                return "instance_get", iid
            case ["instance", bid, "get_by_build_id"]:
                return "by_build_id", bid
        return None, ""

    def _answer(self, route: str, arg: str, signer: str | None) -> tuple[int, Any]:
        svc = self.svc
        local = self.client_address[0].startswith("127.0.0.1") and svc.local_bypass
        has_auth = "Authorization" in self.headers
        needs_sig = route in ("instance_get", "instance_list") or (
            route.startswith("account") and not local)
        if needs_sig and not has_auth:
            return 401, {"error": "Missing signature"}
        if has_auth and signer is None:
            return 401, {"error": "Failed to recover public key"}
        with svc.lock:
            accounts = [dict(a) for a in svc.accounts]
            instances = [dict(i) for i in svc.instances]
            admin = signer is not None and signer in svc.admins
        me = next((a for a in accounts if a.get("address") == signer), None)

        def may_see(iid: str) -> bool:
            if admin:
                return True
            if me is None:
                return False
            return iid in (me.get("owned_instances") or []) or iid in (
                me.get("authorized_instances") or {})

        if route == "account_list":
            shown = accounts if local or admin else [me] if me else []
            return 200, {"success": True, "message": "Retrieved all accounts (localhost access)",
                         "accounts": shown, "total": len(shown)}
        if route == "account_get":
            found = next((a for a in accounts if a.get("address") == arg), None)
            if found is None:
                return 404, {"success": False, "error": f"Account {arg} not found"}
            return 200, {"success": True, "account": found}
        if route == "instance_get":
            inst = next((i for i in instances if i.get("instance_id") == arg), None)
            if inst is None:
                return 404, {"success": False, "error": f"Unable to find instance with id: {arg}"}
            if not may_see(arg):
                return 403, {"success": False,
                             "error": "You don't have permission to access this instance"}
            return 200, {"success": True, "instance": inst}
        if route == "instance_list":
            shown = [i for i in instances if may_see(str(i.get("instance_id")))]
            return 200, {"success": True, "count": len(shown), "instances": shown}
        return 200, {"Success": {"List": [i for i in instances if i.get("build_id") == arg]}}

    def _apply(self, fault: Fault, route: str, signer: str | None) -> bool:
        """Act out a fault; True when the request is finished."""
        kind = fault.kind
        if kind == "reset":
            self.close_connection = True
            self._log(route, signer, 0)
            return True
        if kind == "slow":
            if self.svc._stopping.wait(fault.delay_s):
                self._log(route, signer, 0)
                return True
            return False
        if kind == "http":
            self._send(fault.status, {"error": "simulated failure"}, route, signer)
            return True
        if kind == "garbage":
            self._raw(200, b'{"success": true, "accounts": [{"addr', route, signer)
            return True
        if kind == "success_false":
            self._send(200, {"success": False, "error": "simulated: state not ready"}, route,
                       signer)
            return True
        if kind == "wrong_types":
            self._send(200, {"success": True, "accounts": [
                {"address": "ab" * 20, "owned_instances": "not-a-list"}], "total": 1},
                route, signer)
            return True
        if kind == "body":
            self._raw(fault.status, fault.body, route, signer)
            return True
        if kind == "huge":
            self._huge(fault, route, signer)
            return True
        if kind == "drip":
            return False  # answered normally, byte by byte, by do_GET
        raise AssertionError(f"unknown fault {kind!r}")

    def _huge(self, fault: Fault, route: str, signer: str | None) -> None:
        head, tail = b'{"success": true, "total": 1, "accounts": [{"address": "', b'"}]}'
        pad = max(0, fault.size_bytes - len(head) - len(tail))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if fault.declare_length:
            self.send_header("Content-Length", str(len(head) + pad + len(tail)))
        self.end_headers()
        self._log(route, signer, 200)
        try:
            self.wfile.write(head)
            chunk = b"a" * 65536
            left = pad
            while left > 0 and not self.svc._stopping.is_set():
                self.wfile.write(chunk[:left])
                left -= min(left, len(chunk))
            self.wfile.write(tail)
        except OSError:  # the client gave up at its cap, as it should
            pass
        self.close_connection = True

    def _drip(self, route: str, doc: Any, fault: Fault, signer: str | None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._log(route, signer, 200)
        try:
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1])
                self.wfile.flush()
                if self.svc._stopping.wait(fault.delay_s):
                    return
        except OSError:
            pass

    def _send(self, status: int, doc: Any, route: str | None, signer: str | None) -> None:
        self._raw(status, json.dumps(doc).encode(), route, signer)

    def _raw(self, status: int, body: bytes, route: str | None, signer: str | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._log(route, signer, status)  # before the body: a test may look right after
        with suppress(OSError):
            self.wfile.write(body)

    def _log(self, route: str | None, signer: str | None, status: int) -> None:
        with self.svc.lock:
            self.svc.requests.append(Request(route or "?", self.path, signer, status))


@contextmanager
def serve_accounts(accounts: Iterable[dict[str, Any]] = (),
                   instances: Iterable[dict[str, Any]] = (), *, prefix: str = "/v1",
                   admins: Iterable[str] = (), local_bypass: bool = True
                   ) -> Iterator[AccountService]:
    """Run a stand-in account service for the duration of a `with` block."""
    svc = AccountService(list(accounts), list(instances), prefix, set(admins), local_bypass)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
