"""The daemon in miniature, shared by the kill -9 chaos tests (queue and NATS): commit passes
from the persisted baselines, let the delivery drain them, print `done` once the sink's backlog
is empty. A SIGKILL at any moment leaves what a real daemon would leave."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from hostagent.delivery.engine import Delivery
from hostagent.model import Baseline
from hostagent.store.outbox import Store
from tests.standins.queue import PERIOD_NS, T0_NS
from tests.standins.queue import usage_event as make_event


async def commit_then_drain(store: Store, d: Delivery, sink: str, *, instances: int,
                            passes: int) -> None:
    """Commit `passes` periods of `instances` instances (resuming from the baselines), then
    wait until `sink` has nothing pending; waking the delivery while it waits."""
    while True:
        bases = await trio.to_thread.run_sync(store.load_baselines)
        ks = {f"i{i}": (bases[f"i{i}"].t_wall_ns - T0_NS) // PERIOD_NS
              if f"i{i}" in bases else 0 for i in range(instances)}
        todo = {iid: k for iid, k in ks.items() if k < passes}
        if not todo:
            break
        events = [make_event(iid, k) for iid, k in todo.items()]
        new = [Baseline(iid, "inc-1", T0_NS + (k + 1) * PERIOD_NS, k + 1)
               for iid, k in todo.items()]
        await trio.to_thread.run_sync(store.commit_pass, new, events)
        d.wake()
        await trio.sleep(0.01)
    while True:
        await d.drained()
        await d.refresh_metrics()
        if d.metrics().sinks[sink].depth == 0:
            break
        d.wake()
        await trio.sleep(0.05)
    print("done", flush=True)


def kill_while_running(spawn: Callable[[], subprocess.Popen[str]], rng: random.Random, *,
                       max_wait_s: float, between: Callable[[], None] | None = None) -> None:
    """Start the miniature, wait for its `ready`, let it run up to `max_wait_s` (then
    `between()`, e.g. kill the server under it), and SIGKILL it."""
    proc = spawn()
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    time.sleep(rng.uniform(0.0, max_wait_s))
    if between is not None:
        between()
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_to_done(spawn: Callable[[], subprocess.Popen[str]], timeout_s: float = 60) -> None:
    """Start the miniature once more and let it finish: it must print `ready` and `done`."""
    proc = spawn()
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err
    assert out.split() == ["ready", "done"]


async def deliver_until_done(store: Store, d: Delivery, sink: str, *, instances: int,
                             passes: int) -> None:
    """The child's whole life: start delivery, say `ready`, commit and drain, close."""
    async with trio.open_nursery() as nursery:
        await nursery.start(d.run)
        print("ready", flush=True)
        await commit_then_drain(store, d, sink, instances=instances, passes=passes)
        nursery.cancel_scope.cancel()
    store.close()


def spawn_child(test_file: str, *args: str, stderr: int = subprocess.PIPE
                ) -> subprocess.Popen[str]:
    """Run `test_file` as a program (`child ARGS...`) from the repository root."""
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen([sys.executable, test_file, "child", *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
