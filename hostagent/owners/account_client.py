"""httpx client for Formation's account service (form-state).

Every request has one overall deadline (`timeout_s`, covering a server that drips its body)
and a body cap (`max_response_bytes`, checked against Content-Length and while streaming; a
gzip or deflate body is inflated here, never past the cap, so a compression bomb costs no more
memory than a plain body; other content encodings are refused).
Responses are parsed by the pure, type-checked parsers of `hostagent.owners.accounts`.

::

    OwnerLookupError   the service is down, slow, refused us (401/403), answered 5xx,
                       or sent a body that is too big, not JSON, success:false or ill-typed

"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING
from urllib.parse import quote

import orjson
import trio

from hostagent.clock import Clock
from hostagent.config.schema import OwnersConfig
from hostagent.errors import OwnerLookupError
from hostagent.owners.accounts import (
    Account,
    AccountList,
    InstanceRecord,
    bad_field,
    clip,
    envelope,
    json_body,
    one_line,
    parse_account,
    parse_account_list,
    parse_by_build_id,
    parse_instance_get,
    snippet,
)
from hostagent.owners.signing import Signer

if TYPE_CHECKING:  # imported when used: httpx costs ~18 MB of RSS in a daemon without it
    import httpx

# zlib's wbits for the content encodings we inflate: gzip; deflate (zlib-wrapped, as RFC 9110
# says, or gzip: auto-detected). Raw deflate, br, zstd and stacked encodings are refused.
_INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS,
                  "deflate": 32 + zlib.MAX_WBITS}

# --- the client -----------------------------------------------------------------------------


class AccountClient:
    """Talks to form-state; every method raises OwnerLookupError and nothing else on faults."""

    def __init__(self, cfg: OwnersConfig, clock: Clock, signer: Signer | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._cfg = cfg
        self._clock = clock
        self._signer = signer
        self._prefix = "/" + cfg.prefix.strip("/") if cfg.prefix.strip("/") else ""
        import httpx

        self._http = httpx.AsyncClient(
            base_url=cfg.url.rstrip("/"), timeout=httpx.Timeout(cfg.timeout_s),
            transport=transport, follow_redirects=False, trust_env=False,
            # Explicit: httpx would add br/zstd when those packages happen to be installed.
            headers={"Accept": "application/json", "Accept-Encoding": "gzip, deflate",
                     "User-Agent": "hostagent"},
        )

    @property
    def can_sign(self) -> bool:
        """Whether signed routes (instance get/list) can be used."""
        return self._signer is not None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def path(self, *segments: str) -> str:
        """The URL path of a route, each segment percent-quoted."""
        try:
            return self._prefix + "".join("/" + quote(s, safe="") for s in segments)
        except UnicodeEncodeError as err:  # a lone surrogate: no URL can carry it
            raise OwnerLookupError(f"{clip(repr(segments))}: not encodable in a URL") from err

    async def get(self, path: str, *, signed: bool = False) -> tuple[int, bytes]:
        """GET `path` → (status, body) within the deadline and size cap."""
        headers: dict[str, str] = {}
        if signed:
            if self._signer is None:
                raise OwnerLookupError(f"{clip(path)} needs a signature and no owners.key_file "
                                       "is set")
            headers = self._signer.header_for("GET", path, self._clock.now().wall_ns // 10**9)
        import httpx

        shown = clip(path)
        # One deadline for the whole exchange: httpx's per-read timeout alone lets a server
        # that drips a byte every few seconds hold the request forever.
        with trio.move_on_after(self._cfg.timeout_s):
            try:
                return await self._fetch(path, headers)
            # InvalidURL (e.g. a URL over 64 KiB, from a very long instance id) is not an
            # HTTPError in httpx: it escaped as an "unexpected" error, with a traceback as
            # long as the id, and the instance was asked again at every pass.
            except (httpx.HTTPError, httpx.InvalidURL) as err:
                raise OwnerLookupError(
                    f"GET {shown}: {type(err).__name__}: {clip(str(err), 300)}") from err
        raise OwnerLookupError(f"GET {shown}: no complete answer within {self._cfg.timeout_s}s")

    async def _fetch(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        cap = self._cfg.max_response_bytes
        async with self._http.stream("GET", path, headers=headers) as resp:
            shown = clip(path)
            declared = resp.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise OwnerLookupError(f"GET {shown}: body of {declared} bytes exceeds "
                                       f"max_response_bytes={cap}")
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            inflater = None
            if encoding not in ("", "identity"):
                wbits = _INFLATE_WBITS.get(encoding)
                if wbits is None:
                    raise OwnerLookupError(f"GET {shown}: unsupported Content-Encoding "
                                           f"{clip(encoding, 40)!r}")
                inflater = zlib.decompressobj(wbits)
            too_big = OwnerLookupError(f"GET {shown}: body exceeds max_response_bytes={cap}")
            chunks: list[bytes] = []
            size = 0
            # Raw bytes, inflated here: httpx's own decoder inflates a whole network read at
            # once (64 KiB of gzip is 64 MiB of body), so a bomb took ~150 MB past a 16 MiB cap.
            async for raw in resp.aiter_raw():
                chunk = raw
                if inflater is not None:
                    try:
                        chunk = inflater.decompress(raw, cap - size + 1)
                    except zlib.error as err:
                        raise OwnerLookupError(f"GET {shown}: bad {encoding} body: {err}"
                                               ) from err
                size += len(chunk)
                if size > cap:  # inflating stops at cap + 1: over the cap, never further
                    raise too_big
                chunks.append(chunk)
            return resp.status_code, b"".join(chunks)

    def _expect_ok(self, path: str, status: int, body: bytes) -> None:
        if status != 200:
            detail = snippet(body)
            try:
                doc = orjson.loads(body)
                if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                    detail = one_line(doc["error"])
            except orjson.JSONDecodeError:
                pass
            raise OwnerLookupError(f"GET {clip(path)}: HTTP {status}: {detail}")

    async def fetch_account_list(self) -> bytes:
        """Raw body of `account/list` (parse with `parse_account_list`, e.g. in a thread)."""
        path = self.path("account", "list")
        status, body = await self.get(path)
        self._expect_ok(path, status, body)
        return body

    async def list_accounts(self) -> AccountList:
        """All accounts (unsigned: form-state answers 127.0.0.1 without a signature)."""
        return parse_account_list(await self.fetch_account_list())

    async def get_account(self, address: str) -> Account | None:
        """One account by exact address; None when the service says it does not exist."""
        path = self.path("account", address, "get")
        status, body = await self.get(path)
        if status == 404:
            return None
        self._expect_ok(path, status, body)
        return parse_account(envelope(json_body(body)).get("account"))[0]

    async def get_instance(self, instance_id: str) -> InstanceRecord | None:
        """One instance (signed request); None when unknown (404)."""
        path = self.path("instance", instance_id, "get")
        status, body = await self.get(path, signed=True)
        if status == 404:
            return None
        self._expect_ok(path, status, body)
        record = parse_instance_get(body)
        if record.instance_id != instance_id:
            raise bad_field("instance.instance_id", clip(repr(instance_id)), record.instance_id)
        return record

    async def get_by_build_id(self, build_id: str) -> tuple[InstanceRecord, ...]:
        """Every instance of a build (the VM name a Formation host sees); unsigned."""
        path = self.path("instance", build_id, "get_by_build_id")
        status, body = await self.get(path)
        self._expect_ok(path, status, body)
        return parse_by_build_id(body)
