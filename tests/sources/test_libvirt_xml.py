"""LibvirtSource.domain_xml: all of a pass's XML in ONE worker call, bounded by the deadline."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio

from hostagent import handoff
from hostagent.config.schema import LibvirtConfig
from hostagent.errors import SourceTimeout
from hostagent.source_model import DomainStats
from hostagent.sources.libvirt import LibvirtSource
from tests.clocks import FakeClock


class Dom:
    def __init__(self, name: str, *, hang: threading.Event | None = None,
                 fail: bool = False) -> None:
        self.name, self.hang, self.fail, self.calls = name, hang, fail, 0

    def XMLDesc(self, flags: int) -> str:
        self.calls += 1
        if self.hang is not None:
            self.hang.wait(30)
        if self.fail:
            raise RuntimeError("domain not found")
        return f"<domain><name>{self.name}</name></domain>"


def stats(dom: Dom) -> DomainStats:
    return DomainStats(uuid=f"uuid-{dom.name}", name=dom.name, domid=1, stats={}, handle=dom)


def source() -> LibvirtSource:
    cfg = LibvirtConfig(uri="test:///default", call_timeout_s=0.5)
    return LibvirtSource(cfg, clock=FakeClock(), limiter=trio.CapacityLimiter(4))


async def test_the_xml_of_a_pass_is_one_worker_call(monkeypatch: pytest.MonkeyPatch) -> None:
    doms = [Dom(f"vm{i}") for i in range(50)] + [Dom("gone", fail=True)]
    calls: list[Any] = []
    real = handoff.run_sync

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(handoff, "run_sync", counted)
    got = await source().domain_xml([stats(d) for d in doms])
    assert len(calls) == 1
    assert got["uuid-vm7"] == "<domain><name>vm7</name></domain>"
    assert isinstance(got["uuid-gone"], RuntimeError)  # a failure is returned, not raised
    assert len(got) == 51


async def test_what_is_not_fetched_by_the_deadline_times_out() -> None:
    """One XMLDesc hangs: the ones before it are kept, it and the ones after time out, and the
    abandoned call fetches no more once it returns."""
    hang = threading.Event()
    doms = [Dom("a"), Dom("b"), Dom("stuck", hang=hang), Dom("c"), Dom("d")]
    try:
        got = await source().domain_xml([stats(d) for d in doms])
    finally:
        hang.set()
    assert got["uuid-a"] == "<domain><name>a</name></domain>"
    assert got["uuid-b"] == "<domain><name>b</name></domain>"
    for name in ("stuck", "c", "d"):
        assert isinstance(got[f"uuid-{name}"], SourceTimeout), name
    await trio.sleep(0.2)  # the released worker stops before the next domain
    assert doms[3].calls == doms[4].calls == 0
