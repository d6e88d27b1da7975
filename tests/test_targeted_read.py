"""A read of a few domains between passes (`read_host(only=...)`: a VM started, a device
plugged) asks libvirt for those domains alone, on recorded host trees (libvirt replayed), and
leaves what the passes keep about every other domain as it was: the inventory, the instance
ids, libvirt's XML change notices and the periodic XML re-reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.replay import Host
from tests.test_collector import make_collector


@pytest.fixture(params=["lab-hybrid", "systemd-v2"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> Host:
    return Host(tmp_path, request.param)


async def test_a_read_of_one_domain_asks_for_it_alone_and_keeps_the_others(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    first = await coll.run_pass()
    assert first.committed, first.error
    uuids = sorted(host.bulk("t0"))
    assert len(uuids) >= 2
    a, b = uuids[:2]
    conn = host.conn
    coll.xml_changes.tell(b)  # libvirt said b's XML changed: the next pass must read it
    bulk, listed, xml = conn.bulk_calls, conn.list_calls, conn.xml_calls
    got = await coll.read_host(only={a})
    assert got.path == "targeted" and got.errors == ()
    assert [r.uuid for r in got.domains] == [a]
    assert got.domains[0].instance_id == next(
        s.instance_id for s in first.samples if s.uuid == a)
    assert (conn.bulk_calls, conn.list_calls, conn.lookups) == (bulk, listed + 1, 1)
    assert conn.xml_calls == xml  # a's XML is known and unchanged: not fetched again
    assert all(coll.inventory.get(u) is not None for u in uuids)  # nobody forgotten
    host.move_to_t1()
    second = await coll.run_pass()
    assert second.committed, second.error
    assert sorted(s.uuid for s in second.samples) == uuids
    assert second.events == len(uuids)  # every domain billed, none withheld for identity
    assert conn.xml_calls == xml + 1  # b's notice was left for this pass: read once
    store.close()


async def test_a_listing_or_a_read_of_many_domains_makes_the_bulk_call(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    uuids = set(host.bulk("t0"))
    bulk = host.conn.bulk_calls
    listing = await coll.read_host(only=set())
    assert listing.listed.keys() == uuids and listing.domains == ()
    coll.TARGETED_MAX = len(uuids) - 1
    many = await coll.read_host(only=uuids)
    assert many.path == "bulk" and {r.uuid for r in many.domains} == uuids
    assert host.conn.bulk_calls == bulk + 2 and host.conn.lookups == 0
    store.close()


async def test_an_unknown_uuid_is_not_read_and_a_restarted_domain_keeps_its_id(
        host: Host, tmp_path: Path) -> None:
    coll, store = make_collector(host, tmp_path)
    first = await coll.run_pass()
    assert first.committed, first.error
    a, b = sorted(host.bulk("t0"))[:2]
    got = await coll.read_host(only={"00000000-0000-4000-8000-000000000000"})
    assert got.domains == () and got.errors == ()
    # `a` restarted since the pass (a new process): its old incarnation still holds the id.
    ids = coll._instance_ids
    (key_a,) = [k for k in ids.holders() if k[0] == a]
    iid_a = ids.get(key_a)
    ids.keep_only([k for k in ids.holders() if k != key_a])
    ids._ids[(a, key_a[1] + 1000)] = iid_a  # an older process of `a`
    got = await coll.read_host(only={a, b})
    assert got.errors == ()  # the old process of the same UUID runs no more
    assert {r.uuid: r.instance_id for r in got.domains}[a] == iid_a
    store.close()
