"""The hand-over of light readings from the sampler thread to trio (hostagent/light_inbox.py)."""

from __future__ import annotations

import threading
import time

from hostagent.accounting.closeout import LightReading
from hostagent.light_inbox import LightInbox


def reading(uuid: str, t_ns: int, cpu_ns: int) -> LightReading:
    return LightReading(uuid=uuid, domid=1, t_wall_ns=t_ns, cpu_ns=cpu_ns, nics=(), io=None,
                        missing={})


def test_take_gives_the_newest_reading_per_domain_once() -> None:
    box = LightInbox()
    box.begin()
    box.put({"a": reading("a", 1, 10), "b": reading("b", 1, 20)})
    box.begin()
    box.put({"a": reading("a", 2, 11)})
    got = box.take()
    assert {u: r.cpu_ns for u, r in got.items()} == {"a": 11, "b": 20}
    assert box.take() == {}


def test_wait_idle_waits_for_the_sample_in_flight_and_times_out_without_its_end() -> None:
    box = LightInbox()
    assert box.wait_idle(0) and not box.busy
    box.begin()
    assert box.busy
    t0 = time.monotonic()
    assert not box.wait_idle(0.05)
    assert time.monotonic() - t0 >= 0.05
    ender = threading.Timer(0.05, box.put, args=({"a": reading("a", 3, 12)},))
    ender.start()
    assert box.wait_idle(5)
    assert box.take()["a"].cpu_ns == 12
    ender.join()


def test_a_failed_sample_ends_with_nothing_to_take() -> None:
    box = LightInbox()
    box.begin()
    box.put({})
    assert not box.busy and box.take() == {}
