"""The view: snapshots from pass reports (pure), ownership index, carried usage."""

from __future__ import annotations

from dataclasses import replace

from hostagent.api.view import ApiView, Snapshot, build_snapshot, render_instance, sum_usage
from hostagent.model import Owner
from hostagent.owners.resolver import UNASSIGNED_SOURCE
from tests.api.support import Report, report, sample

ABC = "abc" + "0" * 37
DEF = "def" + "0" * 37


def test_index_and_visibility() -> None:
    rep = report({"i-1": ABC.upper(), "i-2": "u2", "i-3": "unassigned"})
    rep.owners = {**rep.owners, "i-3": Owner("unassigned", "org-1", UNASSIGNED_SOURCE)}
    snap = build_snapshot(rep, Snapshot(),
                          lambda iid: {"0x" + DEF: "Manager"} if iid == "i-2" else {})
    for abc in (ABC, "0x" + ABC, "0X" + ABC.upper(), ABC.upper()):
        assert [iv.instance_id for iv in snap.for_user(abc)] == ["i-1"], abc
        assert snap.instances["i-1"].visible_to(abc)
    assert [iv.instance_id for iv in snap.for_user(DEF.upper())] == ["i-2"]
    assert snap.for_user("nobody") == []
    assert snap.instances["i-2"].visible_to("0x" + DEF.upper())
    assert not snap.instances["i-1"].visible_to("u2")


def test_an_unknown_owner_is_nobody() -> None:
    """Issue 13 §6: a principal named `unassigned` must not read the unowned instances."""
    rep = report({"i-1": "unassigned"})
    rep.owners = {"i-1": Owner("unassigned", "org-1", UNASSIGNED_SOURCE)}
    snap = build_snapshot(rep, Snapshot(), lambda _: {})
    assert snap.for_user("unassigned") == []
    assert not snap.instances["i-1"].visible_to("unassigned")


def test_usage_carried_until_next_period_and_dropped_on_new_incarnation() -> None:
    view = ApiView()
    view.update(report({"i-1": "u"}))
    first = view.snapshot.instances["i-1"].usage
    view.update(Report(samples=(sample("i-1"),), owners={}))  # no new period this pass
    assert view.snapshot.instances["i-1"].usage is first
    view.update(Report(samples=(replace(sample("i-1"), incarnation="inc2"),)))
    assert view.snapshot.instances["i-1"].usage is None
    assert view.snapshot.pass_info.passes == 3


def test_gone_instances_disappear_and_failed_pass_keeps_state() -> None:
    view = ApiView()
    view.update(report({"i-1": "u", "i-2": "u"}))
    view.update(Report(committed=False, error="boom"))
    assert set(view.snapshot.instances) == {"i-1", "i-2"}
    assert view.snapshot.pass_info.error == "boom"
    view.update(report({"i-2": "u"}))
    assert set(view.snapshot.instances) == {"i-2"}
    assert view.snapshot.pass_info.failed_passes == 1


def test_render_and_sum() -> None:
    snap = build_snapshot(report({"i-1": "u", "i-2": "u"}, cpu_s=7), Snapshot(), lambda _: {})
    item = render_instance(snap.instances["i-1"], ("cpu",))
    assert item["metrics"] == {"cpu": {"cpu_seconds": 7, "cpu_percent_avg": 50.0, "vcpus": 2}}
    assert item["period"]["start"] == "2025-11-13T02:12:50Z"
    t = sum_usage(snap.instances.values())
    assert t["cpu_seconds"] == 14
    assert t["memory_gb"] == 4.0
