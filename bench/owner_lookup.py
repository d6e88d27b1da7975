"""Owner lookup cost per pass (1,000 instances, warm cache); index rebuild (10,000 accounts).

Printed, not asserted. The rebuild is what each refresh does off the hot path (in a worker
thread): parse + validate the `account/list` body, build the index, swap it in.

    python bench/owner_lookup.py [--instances 1000] [--accounts 10000] [--passes 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostagent.config.schema import OwnersConfig
from hostagent.model import OwnerHint
from hostagent.owners.accounts import Account, parse_account_list
from hostagent.owners.index import build_index, index_from_body
from hostagent.owners.resolver import Owners
from tests.clocks import FakeClock


def account_doc(n: int, owned: int) -> dict[str, object]:
    """One account shaped like form-state's serde output."""
    addr = f"{n:040x}"
    return {
        "address": addr, "name": f"user-{n}", "is_global_admin": False,
        "owned_instances": [f"{n:08x}{k:032x}" for k in range(owned)],
        "owned_agents": [], "owned_models": [],
        "authorized_instances": {f"{(n + 1):08x}{0:032x}": "Operator"},
        "subscription": None, "usage": None, "credits": 1000, "hired_agents": [],
        "created_at": 1_700_000_000, "updated_at": 1_700_000_000,
    }


def bench_resolve(instances: int, passes: int) -> None:
    """Per-pass cost of `instances` resolves against a warm cache."""
    owners = Owners(OwnersConfig(enabled=False), FakeClock(), None)
    accounts = [Account(f"{n:040x}", tuple(f"i-{n}-{k}" for k in range(4)))
                for n in range(instances // 4 + 1)]
    owners.install_index(build_index(accounts))
    from_index = [f"i-{n // 4}-{n % 4}" for n in range(instances)]
    hinted = [(iid, OwnerHint(f"user-{n}", f"org-{n}", "metadata:nova"))
              for n, iid in enumerate(from_index)]
    mixed: list[tuple[str, OwnerHint | None]] = []
    for n, iid in enumerate(from_index):  # 80 % index, 10 % metadata hint, 10 % unknown
        if n % 10 == 0:
            mixed.append((iid, hinted[n][1]))
        elif n % 10 == 1:
            mixed.append((f"unknown-{n}", None))
        else:
            mixed.append((iid, None))

    cases: dict[str, list[tuple[str, OwnerHint | None]]] = {
        "all from the index": [(iid, None) for iid in from_index],
        "all from metadata hints": list(hinted),
        "mixed 80/10/10 (index/hint/unassigned)": mixed,
    }
    print(f"owner lookup, {instances} resolves per pass, warm cache, {passes} passes:")
    for label, pairs in cases.items():
        resolve = owners.resolve
        for iid, hint in pairs:  # warm: first sight of each instance stores its owner
            resolve(iid, hint)
        samples_us: list[float] = []
        for _ in range(passes):
            t0 = time.perf_counter_ns()
            for iid, hint in pairs:
                resolve(iid, hint)
            samples_us.append((time.perf_counter_ns() - t0) / 1e3)
        samples_us.sort()
        p99 = samples_us[int(len(samples_us) * 0.99) - 1]
        print(f"  {label:42s} median {statistics.median(samples_us):7.1f} µs/pass  "
              f"p99 {p99:7.1f} µs  ({statistics.median(samples_us) / instances * 1e3:.0f} "
              f"ns/resolve)  target < 1000 µs")


def bench_rebuild(n_accounts: int, owned: int, runs: int) -> None:
    """Time to rebuild the index from an `account/list` body of `n_accounts` accounts."""
    docs = [account_doc(n, owned) for n in range(n_accounts)]
    body = orjson.dumps({"success": True, "message": "Retrieved all accounts (localhost access)",
                         "accounts": docs, "total": len(docs)})
    owners = Owners(OwnersConfig(enabled=False), FakeClock(), None)
    parse_ms, build_ms, swap_ms, total_ms = [], [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        listing = parse_account_list(body)
        t1 = time.perf_counter()
        index = build_index(listing.accounts)
        t2 = time.perf_counter()
        owners.install_index(index)
        t3 = time.perf_counter()
        index_from_body(body)
        t4 = time.perf_counter()
        parse_ms.append((t1 - t0) * 1e3)
        build_ms.append((t2 - t1) * 1e3)
        swap_ms.append((t3 - t2) * 1e3)
        total_ms.append((t4 - t3) * 1e3)
    print(f"index rebuild, {n_accounts} accounts ({n_accounts * owned} owned instances, "
          f"{n_accounts} authorized roles, body {len(body) / 1e6:.1f} MB), median of {runs}:")
    print(f"  parse + validate   {statistics.median(parse_ms):7.1f} ms   (worker thread)")
    print(f"  build index        {statistics.median(build_ms):7.1f} ms   (worker thread)")
    print(f"  swap in            {statistics.median(swap_ms):7.1f} ms   (trio thread)")
    print(f"  index_from_body    {statistics.median(total_ms):7.1f} ms   (parse+validate+build)")
    print(f"  index size         {len(index.owners)} instances, {len(index.roles)} with roles")


def main() -> None:
    """Run both benchmarks and print the numbers."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--accounts", type=int, default=10_000)
    ap.add_argument("--owned", type=int, default=2, help="instances owned per account")
    ap.add_argument("--passes", type=int, default=300)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}")
    bench_resolve(args.instances, args.passes)
    bench_rebuild(args.accounts, args.owned, args.runs)


if __name__ == "__main__":
    main()
