"""Test support for the API: synthetic pass reports, real keys and a real server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hostagent.alerts.index import Settings
from hostagent.alerts.rule_store import LayeredRuleStore
from hostagent.alerts.rules_source import RulesSource
from hostagent.api import keys as keys_mod
from hostagent.api.auth import Authenticator
from hostagent.api.backends import StoreWebhooks
from hostagent.api.pass_gate import PassGate
from hostagent.api.server import make_app, serve_api
from hostagent.api.view import ApiView
from hostagent.clock import SystemClock
from hostagent.config.schema import ApiConfig
from hostagent.config.sinks import WebhookSinkConfig
from hostagent.delivery.ssrf import Guard
from hostagent.model import MemoryReading, NicCounters, Owner, Sample, Usage
from hostagent.store.outbox import Store
from hostagent.store.webhooks import WebhookStore

T0_NS = 1_763_000_000 * 10**9
AUD = "hostagent-test"
ISS = "https://issuer.test"
ALICE = "0xa11ce00000000000000000000000000000000000"
ALICE_UPPER = "0xA11CE00000000000000000000000000000000000"  # ALICE as a key file may spell it
BOB = "0xb0b0000000000000000000000000000000000000"
DAVE = "0xda7e000000000000000000000000000000000000"


@dataclass
class Report:
    """Duck-typed PassReport (the view reads only these fields)."""

    started_wall_ns: int = T0_NS
    duration_s: float = 0.05
    domains: int = 0
    events: int = 0
    committed: bool = True
    error: str | None = None
    usages: tuple[Usage, ...] = ()
    samples: tuple[Sample, ...] = ()
    owners: Mapping[str, Owner] = field(default_factory=dict)
    read_errors_total: Mapping[str, int] = field(default_factory=dict)


def usage(iid: str, *, cpu_s: int = 30, mem: int = 2 << 30, egress: int = 10 << 20) -> Usage:
    """A usage of a 30 s period."""
    return Usage(instance_id=iid, uuid=f"uuid-{iid}", name=f"vm-{iid}", incarnation="inc1",
                 new_incarnation=False, period_start_ns=T0_NS - 30 * 10**9,
                 period_end_ns=T0_NS, vcpus=2, memory_alloc_bytes=4 << 30, cpu_ns=cpu_s * 10**9,
                 cpu_seconds=cpu_s, cpu_percent_avg=50.0, memory_bytes=mem,
                 memory_source="balloon", memory_percent=50.0, storage_bytes=10 << 30,
                 storage_capacity_bytes=20 << 30, net_egress_bytes=egress,
                 net_ingress_bytes=egress // 2, disk_read_bytes=1000, disk_write_bytes=2000,
                 gpu_count=0, gpu_seconds=0, gpu_util_avg=None)


def sample(iid: str) -> Sample:
    """A sample matching `usage(iid)`."""
    return Sample(instance_id=iid, uuid=f"uuid-{iid}", name=f"vm-{iid}", domid=1,
                  incarnation="inc1", started_wall_ns=T0_NS - 3600 * 10**9, t_wall_ns=T0_NS,
                  vcpus=2, memory_alloc_bytes=4 << 30, cpu_ns=3600 * 10**9,
                  memory=MemoryReading(2 << 30, "balloon"),
                  nics=(NicCounters("52:54:00:00:00:01", "vnet0", 5, 100, 200, "netlink"),))


def report(owned: Mapping[str, str], **kw: Any) -> Report:
    """A committed pass with one instance per key of `owned` (instance → owner user id)."""
    iids = sorted(owned)
    return Report(domains=len(iids), events=len(iids),
                  usages=tuple(usage(i, **kw) for i in iids),
                  samples=tuple(sample(i) for i in iids),
                  owners={i: Owner(u, "org-1", "account-service") for i, u in owned.items()})


@dataclass
class Keys:
    """Real signing keys and their public halves on disk."""

    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rsa_pem: bytes
    pem_file: Path
    jwks_file: Path
    keys_file: Path
    read_key: str
    admin_key: str
    other_key: str


def make_keys(tmp: Path) -> Keys:
    """RSA (PEM file) + EC (JWKS file, kid "ec1") + an API keys file with three keys."""
    rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ek = ec.generate_private_key(ec.SECP256R1())
    pub = rk.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    pem_file = tmp / "jwt_keys.pem"
    pem_file.write_bytes(pub)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ek.public_key()))
    jwk.update({"kid": "ec1", "use": "sig", "alg": "ES256"})
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    keys_file = tmp / "api_keys.toml"
    read_clear, read_k = keys_mod.new_key(ALICE_UPPER, ["read"])
    admin_clear, admin_k = keys_mod.new_key("ops", ["admin"])
    other_clear, other_k = keys_mod.new_key(BOB, ["read"])
    keys_file.write_text("\n".join(keys_mod.to_toml(k) for k in (read_k, admin_k, other_k)))
    return Keys(rk, ek, pub, pem_file, jwks_file, keys_file, read_clear, admin_clear,
                other_clear)


def token(keys: Keys, sub: str = ALICE, *, alg: str = "RS256", exp_s: float = 300,
          **claims: Any) -> str:
    """A real JWT signed with the test RSA (RS*) or EC (ES*) key."""
    now = int(time.time())
    body = {"sub": sub, "iat": now, "exp": now + exp_s, "aud": AUD, "iss": ISS, **claims}
    if alg.startswith("ES"):
        return jwt.encode(body, keys.ec, algorithm=alg, headers={"kid": "ec1"})
    return jwt.encode(body, keys.rsa, algorithm=alg)


def api_config(keys: Keys, **over: Any) -> ApiConfig:
    """An [api] section using the test keys."""
    cfg = ApiConfig(enabled=True, port=0, jwt_algorithms=("RS256", "ES256"),
                    jwt_keys_file=str(keys.pem_file), jwks_file=str(keys.jwks_file),
                    jwt_audience=AUD, jwt_issuer=ISS, api_keys_file=str(keys.keys_file),
                    admin_principals=("0xroot",), rate_per_principal_s=1000.0,
                    burst_per_principal=2000, rate_per_address_s=1000.0, burst_per_address=2000)
    return replace(cfg, **over)


# What the tests' DNS answers (registration checks names that resolve); other names do not
# resolve, which registration accepts (delivery checks again). No test query leaves the host.
DNS = {"public.test": ["93.184.215.14"], "private.test": ["10.1.2.3"],
       "mixed.test": ["93.184.215.14", "192.0.0.8"], "metadata.test": ["169.254.169.254"]}


async def resolver_for_tests(host: str, port: int) -> list[str]:
    """The tests' resolver: `DNS`, else "no such name"."""
    del port
    if host in DNS:
        return DNS[host]
    raise OSError(f"{host}: name does not resolve")


@dataclass
class Server:
    """A running API server over the REAL stores (state file and rules file in a temp dir)."""

    url: str
    view: ApiView
    stop: trio.Event
    webhooks: StoreWebhooks
    webhook_store: WebhookStore
    rules: LayeredRuleStore
    rules_path: Path


async def start_server(nursery: trio.Nursery, cfg: ApiConfig, view: ApiView, *,
                       gate: PassGate | None = None,
                       authenticator: Authenticator | None = None,
                       webhook_sink: WebhookSinkConfig | None = None) -> Server:
    """Serve `view` on 127.0.0.1:<ephemeral> in `nursery` (held back by `gate` if given)."""
    stop = trio.Event()
    tmp = Path(tempfile.mkdtemp(prefix="hostagent-api-"))
    clock = SystemClock()
    outbox = Store.open(tmp / "state.db", clock=clock, node_id="host-t", sink_names=["webhooks"])
    hooks = WebhookStore(tmp / "state.db", clock)
    rules_path = tmp / "rules.json"
    rules_path.write_text("[]")
    source = RulesSource(rules_path, Settings(), api_path=tmp / "api-rules.json")
    source.load_initial()
    webhooks = StoreWebhooks(hooks, Guard.from_config(webhook_sink or WebhookSinkConfig()),
                             resolver=resolver_for_tests)
    rules = LayeredRuleStore(source)
    app = make_app(cfg, view, webhooks=webhooks, rules=rules,
                   authenticator=authenticator or Authenticator(cfg), gate=gate)

    async def cleanup() -> None:
        try:
            await stop.wait()
        finally:
            hooks.close()
            outbox.close()
            shutil.rmtree(tmp, ignore_errors=True)

    nursery.start_soon(cleanup)
    binds = await nursery.start(serve_api, cfg, app, stop)
    return Server(binds[0], view, stop, webhooks, hooks, rules, rules_path)
