"""API benchmark: latency and throughput of /api/v1/usage/users/{id}/current with 1,000
instances, and the collector's pass duration with and without API load.

The server runs in this process's trio loop (as in the daemon); the load comes from separate
client processes (so client CPU is not charged to the server's loop). The pass is measured
quiet, under load with the daemon's PassGate (requests wait while a pass runs, the default),
under load with the gate off (`api.yield_to_pass_max_s = 0`), and under the same load on a
server in another process (machine CPU contention alone). Printed, not asserted.

    .venv/bin/python bench/api.py [--instances 1000] [--clients 50] [--duration 20]
                                  [--client-procs 4] [--domains 1000] [--passes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostagent.api.pass_gate import PassGate  # noqa: E402
from hostagent.api.view import ApiView  # noqa: E402
from hostagent.daemon import PASS_DRAIN_MAX_S  # noqa: E402
from tests.api.support import api_config, make_keys, report, start_server  # noqa: E402

CLIENT_CPUS: set[int] = set()  # --pin: cores of the load generator

# --- client side (runs in child processes) ---------------------------------------------------


async def _client_main(url: str, key: str, paths: list[str], concurrency: int,
                       duration_s: float) -> dict[str, Any]:
    import httpx

    lat_ms: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, limits=limits,
                                 timeout=30) as c:
        async def worker(i: int) -> None:
            n = i
            while time.perf_counter() < deadline:
                path = paths[n % len(paths)]
                n += 1
                t0 = time.perf_counter()
                try:
                    r = await c.get(path)
                    ok = r.status_code == 200
                    r.read()
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                lat_ms.append((time.perf_counter() - t0) * 1e3)
                if not ok:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

        async with trio.open_nursery() as n:
            for i in range(concurrency):
                n.start_soon(worker, i)
    return {"lat_ms": lat_ms, "errors": errors}


def client_process() -> None:
    """`bench/api.py --client URL KEY CONCURRENCY DURATION PATH...`: JSON result on stdout."""
    url, key, conc, dur, *paths = sys.argv[2:]
    out = trio.run(_client_main, url, key, paths, int(conc), float(dur))
    print(json.dumps(out))


async def run_load(url: str, key: str, paths: list[str], clients: int, procs: int,
                   duration_s: float) -> dict[str, Any]:
    """`clients` concurrent clients spread over `procs` processes for `duration_s`."""
    per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    results: list[dict[str, Any]] = []

    async def one(conc: int) -> None:
        cmd = [sys.executable, __file__, "--client", url, key, str(conc), str(duration_s),
               *paths]
        if CLIENT_CPUS:  # --pin: the load runs on other cores, as if from another machine
            cmd = ["taskset", "-c", ",".join(map(str, sorted(CLIENT_CPUS))), *cmd]
        p = await trio.run_process(cmd, capture_stdout=True, check=True)
        results.append(json.loads(p.stdout))

    t0 = time.perf_counter()
    async with trio.open_nursery() as n:
        for conc in per:
            if conc:
                n.start_soon(one, conc)
    wall = time.perf_counter() - t0
    lat = sorted(x for r in results for x in r["lat_ms"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [float("nan")] * 99
    return {"requests": len(lat), "req_per_s": len(lat) / duration_s, "p50_ms": q[49],
            "p99_ms": q[98], "errors": errors, "wall_s": wall}


# --- server side ------------------------------------------------------------------------------


def _cfg(keys: Any, yield_to_pass_max_s: float = 2.0) -> Any:
    return api_config(keys, rate_per_address_s=1e6, burst_per_address=10**6,
                      rate_per_principal_s=1e6, burst_per_principal=10**6,
                      yield_to_pass_max_s=yield_to_pass_max_s)


async def latency(args: argparse.Namespace, keys: Any) -> None:
    view = ApiView()
    view.update(report({f"i-{n:05d}": "0xalice" for n in range(args.instances)}))
    async with trio.open_nursery() as nursery:
        srv = await start_server(nursery, _cfg(keys), view)
        res = await run_load(srv.url, keys.read_key, ["/api/v1/usage/users/0xalice/current"],
                             args.clients, args.client_procs, args.duration)
        srv.stop.set()
    print(f"GET /api/v1/usage/users/{{id}}/current, {args.instances} instances of one user "
          f"(page of 100, totals over all), {args.clients} clients x {args.duration:.0f} s:")
    print(f"  {res['requests']} requests, {res['req_per_s']:.0f} req/s, "
          f"p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms, errors {res['errors']}")


async def pass_ratio(args: argparse.Namespace, keys: Any) -> None:
    from bench.pass_cost import bench_collector, generate

    with tempfile.TemporaryDirectory() as tmp:
        node_xml, root = generate(args.domains, Path(tmp) / "gen")
        coll, store = bench_collector(f"test://{node_xml}", str(root), Path(tmp))
        view = ApiView()
        gate = PassGate()
        drains: list[float] = []
        cpus: list[float] = []  # process CPU during each pass (the server's too, if it runs)

        async def passes(k: int) -> list[float]:
            out = []
            for _ in range(k):
                with gate.busy():  # what Daemon._collect_loop does
                    drains.append(await gate.drain(PASS_DRAIN_MAX_S))
                    rep = await coll.run_pass()
                if rep.error:
                    raise RuntimeError(rep.error)
                view.update(rep)  # what Daemon.on_pass does
                out.append(rep.duration_s)
                cpus.append(rep.cpu_s)
            return out

        await passes(2)  # warm-up: first pass parses XML and has no baselines
        first = next(iter(view.snapshot.instances.values()))
        uid = first.owner.user_id if first.owner else "unassigned"
        paths = [f"/api/v1/usage/users/{uid}/current", "/api/v1/metrics?limit=50",
                 f"/api/v1/usage/instances/{first.instance_id}/current"]
        cpus.clear()
        quiet = await passes(args.passes)
        cpu_quiet = list(cpus)
        cpu_loaded: dict[float, list[float]] = {}
        drained: dict[float, list[float]] = {}
        loaded: dict[float, list[float]] = {}
        load: dict[float, dict[str, Any]] = {}
        for max_wait_s in (2.0, 0.0):  # the default gate, then the gate off
            async with trio.open_nursery() as nursery:
                srv = await start_server(nursery, _cfg(keys, max_wait_s), view, gate=gate)
                done = trio.Event()

                async def drive(m: float = max_wait_s, url: str = srv.url,
                                ev: trio.Event = done) -> None:
                    load[m] = await run_load(url, keys.admin_key, paths, args.clients,
                                             args.client_procs, args.duration)
                    ev.set()

                nursery.start_soon(drive)
                drains.clear()
                cpus.clear()
                loaded[max_wait_s] = await passes_during_load(passes, args.duration, done)
                cpu_loaded[max_wait_s] = list(cpus)
                drained[max_wait_s] = list(drains)
                srv.stop.set()
        # control: the same client load on a server in ANOTHER process (CPU contention only)
        async with trio.open_nursery() as nursery:
            serve = [sys.executable, __file__, "--serve", str(args.domains)]
            if CLIENT_CPUS:  # --pin: the other server shares the load generator's cores
                serve = ["taskset", "-c", ",".join(map(str, sorted(CLIENT_CPUS))), *serve]
            child = await trio.lowlevel.open_process(
                serve,
                stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            assert child.stdout is not None
            assert child.stdin is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await child.stdout.receive_some(4096)
            url, key, path = json.loads(line)
            control: dict[str, Any] = {}
            done2 = trio.Event()

            async def drive2() -> None:
                control.update(await run_load(url, key, [path], args.clients,
                                              args.client_procs, args.duration))
                done2.set()

            nursery.start_soon(drive2)
            separate = await passes_during_load(passes, args.duration, done2)
            await child.stdin.aclose()
            await child.wait()
        store.close()
    mq = statistics.median(quiet)
    print(f"collector pass, {args.domains} domains (libvirt test driver), {os.cpu_count()} CPUs, "
          f"{args.clients} clients in {args.client_procs} processes "
          + ("pinned to other CPUs than the daemon's:" if CLIENT_CPUS else
             "sharing the daemon's CPUs:"))
    print(f"  no load:                               median {mq * 1e3:6.0f} ms "
          f"({len(quiet)} passes)")
    rows = [("daemon's loop, requests wait for pass", loaded[2.0]),
            ("daemon's loop, gate off", loaded[0.0]),
            ("another process (CPU contention)", separate)]
    for name, xs in rows:
        m = statistics.median(xs)
        print(f"  {name + ':':38s} median {m * 1e3:6.0f} ms ({len(xs)} passes)  "
              f"ratio {m / mq:.2f}  max {max(xs) / mq:.2f}")
    cq = statistics.median(cpu_quiet)
    for name, m in (("no load", 0.0), ("gate on", 2.0), ("gate off", 0.0)):
        xs = cpu_quiet if name == "no load" else cpu_loaded[m]
        print(f"  process CPU during a pass, {name + ':':9s} median "
              f"{statistics.median(xs) * 1e3:6.0f} ms  ratio {statistics.median(xs) / cq:.2f}")
    d = drained[2.0]
    print(f"  gate on: a pass waited {statistics.median(d) * 1e3:.1f} ms (median), "
          f"{max(d) * 1e3:.1f} ms (max) for requests in flight before starting")
    for name, r in (("gate on", load[2.0]), ("gate off", load[0.0]),
                    ("other process", control)):
        print(f"  load ({name}): {r['requests']} requests, {r['req_per_s']:.0f} req/s, "
              f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}")


async def passes_during_load(passes: Any, duration_s: float, done: trio.Event,
                             gap_s: float = 1.0) -> list[float]:
    """A pass every `gap_s` while the load runs (after a 1 s ramp-up), so each pass starts
    into a server at full load (the daemon's passes are 30 s apart)."""
    await trio.sleep(1.0)
    out: list[float] = []
    t_end = time.perf_counter() + duration_s - 2
    while time.perf_counter() < t_end:
        out += await passes(1)
        await trio.sleep(gap_s)
    await done.wait()
    return out


def serve_process() -> None:
    """`bench/api.py --serve N`: serve N synthetic instances; print url, key, path; stop on EOF."""
    n = int(sys.argv[2])

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            keys = make_keys(Path(tmp))
            view = ApiView()
            view.update(report({f"i-{i:05d}": "0xalice" for i in range(n)}))
            async with trio.open_nursery() as nursery:
                srv = await start_server(nursery, _cfg(keys), view)
                print(json.dumps([srv.url, keys.read_key,
                                  "/api/v1/usage/users/0xalice/current"]), flush=True)
                await trio.to_thread.run_sync(sys.stdin.read)
                srv.stop.set()

    trio.run(main)


def main() -> int:
    """Run both parts and print the results."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--client-procs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--skip-pass", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--pin", action="store_true",
                    help="run the server and passes on CPU 0 and the load on the other CPUs "
                         "(as if the load came from another machine)")
    args = ap.parse_args()
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("--pin skipped: it needs at least 2 CPUs")
            return 0
        os.sched_setaffinity(0, {cpus[0]})
        CLIENT_CPUS.update(cpus[1:])
    with tempfile.TemporaryDirectory() as tmp:
        keys = make_keys(Path(tmp))
        if not args.skip_latency:
            trio.run(latency, args, keys)
        if not args.skip_pass:
            trio.run(pass_ratio, args, keys)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_process()
    elif len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve_process()
    else:
        raise SystemExit(main())
