"""A read of a few domains between passes (a VM started, a device plugged), on the real
libvirtd: `LibvirtSource.stats_of` asks for those domains alone (a UUID lookup each and one
`domainListGetStats`), and answers what the bulk call would for them: the same domains, the
same stats groups, nothing for an inactive or unknown UUID."""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Iterator

import pytest
import trio

from hostagent.clock import SystemClock
from hostagent.config.schema import LibvirtConfig
from hostagent.sources.libvirt import LibvirtSource
from tests import lab_support

pytestmark = pytest.mark.lab

SLOT = 99  # tap hatap99; no other test uses it (the guest is only defined, never started)


@pytest.fixture
def inactive_guest(lab_guests: list[str]) -> Iterator[str]:
    name = f"haidle-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, SLOT)
    try:
        yield lab_support.domain_uuid(name)
    finally:
        lab_support.remove_guest(name)


async def test_a_targeted_read_answers_those_domains_as_the_bulk_call_does(
        lab_guests: list[str], inactive_guest: str) -> None:
    src = LibvirtSource(LibvirtConfig(uri=lab_support.URI, call_timeout_s=10.0),
                        clock=SystemClock(), limiter=trio.CapacityLimiter(4))
    try:
        bulk = await src.bulk_stats()
        by_uuid = {d.uuid: d for d in bulk.domains}
        wanted = lab_support.domain_uuid(lab_guests[0])
        other = lab_support.domain_uuid(lab_guests[1])
        assert {wanted, other} <= by_uuid.keys() and inactive_guest not in by_uuid
        unknown = str(uuidlib.uuid4())
        got = await src.stats_of({wanted, inactive_guest, unknown})
        assert got.path == "targeted" and got.failed == ()
        assert [d.uuid for d in got.domains] == [wanted]  # not `other`, not the idle ones
        (d,) = got.domains
        ref = by_uuid[wanted]
        assert (d.name, d.domid) == (ref.name, ref.domid)
        # the same groups (CPU, balloon, vCPUs, NICs, disks, state) as the pass's bulk call
        assert d.stats.keys() == ref.stats.keys()
        assert d.stats["net.0.name"] == ref.stats["net.0.name"]
        assert d.stats["cpu.time"] >= ref.stats["cpu.time"]  # read later: never less
        assert (await src.stats_of({inactive_guest, unknown})).domains == ()
        src.ask_cpu = False  # the pass's mask holds for targeted reads too
        assert not any(k.startswith("cpu.")
                       for k in (await src.stats_of({wanted})).domains[0].stats)
    finally:
        src.close()
