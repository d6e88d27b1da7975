"""PassGate: requests wait while a pass runs, never longer than their bound."""

from __future__ import annotations

import trio
import trio.testing

from hostagent.api.pass_gate import PassGate


async def test_open_gate_never_waits() -> None:
    gate = PassGate()
    assert not gate.pass_running
    assert await gate.wait_idle(5.0) == 0.0
    assert gate.deferred_requests == 0


async def test_a_request_waits_until_the_pass_ends(autojump_clock: trio.testing.MockClock
                                                   ) -> None:
    gate = PassGate()
    served_at: list[float] = []

    async def request() -> None:
        await gate.wait_idle(10.0)
        served_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        with gate.busy():
            assert gate.pass_running
            nursery.start_soon(request)
            await trio.sleep(3.0)  # the pass takes 3 s
            assert served_at == []  # held back while the pass runs
        # the pass ended: the request goes on
    assert served_at == [3.0]
    assert gate.deferred_requests == 1
    assert gate.timed_out_waits == 0
    assert not gate.pass_running


async def test_the_wait_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    gate = PassGate()
    with gate.busy():
        t0 = trio.current_time()
        await gate.wait_idle(0.5)
        assert trio.current_time() - t0 == 0.5  # a stuck pass delays answers by 0.5 s only
        assert gate.pass_running
    assert gate.deferred_requests == 1
    assert gate.timed_out_waits == 1


async def test_zero_bound_disables_waiting() -> None:
    gate = PassGate()
    with gate.busy():
        assert await gate.wait_idle(0) == 0.0
    assert gate.deferred_requests == 0


async def test_nested_busy_keeps_the_gate_closed_until_the_outer_block_ends() -> None:
    gate = PassGate()
    with gate.busy():
        with gate.busy():
            pass
        assert gate.pass_running
    assert not gate.pass_running


async def test_a_pass_starts_once_requests_in_flight_finish(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = PassGate()
    finished: list[str] = []

    async def slow_request() -> None:  # e.g. a webhook registration writing SQLite
        async with gate.request(10.0):
            await trio.sleep(0.4)
            finished.append("request")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_request)
        await trio.sleep(0.1)
        assert gate.in_flight == 1
        with gate.busy():
            waited_s = await gate.drain(5.0)
            finished.append("pass starts")
    assert finished == ["request", "pass starts"]
    assert abs(waited_s - 0.3) < 1e-6
    assert gate.in_flight == 0


async def test_the_drain_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    gate = PassGate()
    release = trio.Event()

    async def stuck_request() -> None:
        async with gate.request(10.0):
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stuck_request)
        await trio.sleep(0.1)
        with gate.busy():
            assert abs(await gate.drain(1.0) - 1.0) < 1e-6  # the pass goes on after 1 s
        release.set()
    assert gate.in_flight == 0


async def test_requests_arriving_during_a_pass_do_not_delay_its_drain(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = PassGate()
    order: list[str] = []

    async def request(name: str) -> None:
        async with gate.request(10.0):
            order.append(name)

    async with trio.open_nursery() as nursery:
        with gate.busy():
            assert await gate.drain(1.0) == 0.0  # nothing in flight: starts at once
            nursery.start_soon(request, "late")
            await trio.sleep(2.0)
            order.append("pass ends")
    assert order == ["pass ends", "late"]


async def test_a_request_away_on_its_client_is_not_waited_for_and_comes_back_after_the_pass(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = PassGate()
    marks: list[tuple[str, float, int]] = []

    async def request_with_slow_body() -> None:
        async with gate.request(10.0):
            async with gate.away(10.0):
                await trio.sleep(1.0)  # the client sends its body
            marks.append(("body read", trio.current_time(), gate.in_flight))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request_with_slow_body)
        await trio.sleep(0.1)
        assert gate.in_flight == 0
        with gate.busy():
            assert await gate.drain(5.0) == 0.0  # the pass does not wait for that client
            await trio.sleep(2.0)  # the pass runs 2 s; the body arrived at 1.1 s
            assert marks == []  # the request waits the pass out before it goes on
    assert marks == [("body read", 2.1, 1)]
    assert gate.in_flight == 0


async def test_away_keeps_the_count_whatever_ends_it(
        autojump_clock: trio.testing.MockClock) -> None:
    gate = PassGate()
    with trio.move_on_after(0.5):  # cancelled while away (a server shutting down)
        async with gate.request(10.0), gate.away(10.0):
            await trio.sleep(5.0)
    assert gate.in_flight == 0
    with gate.busy():
        with trio.move_on_after(0.5):  # cancelled while waiting the pass out after the body
            async with gate.request(0.0), gate.away(10.0):
                pass
    assert gate.in_flight == 0
    try:
        async with gate.request(10.0), gate.away(10.0):
            raise ValueError("client gone")
    except ValueError:
        pass
    assert gate.in_flight == 0
    assert await gate.drain(1.0) == 0.0
