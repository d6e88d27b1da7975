"""The view: snapshots from pass reports (pure), ownership index, carried usage."""

from __future__ import annotations

from dataclasses import replace

from hostagent.api.view import ApiView, Snapshot, build_snapshot, render_instance, sum_usage
from tests.api.support import Report, report, sample


def test_index_and_visibility() -> None:
    snap = build_snapshot(report({"i-1": "0xABC", "i-2": "u2"}), Snapshot(),
                          lambda iid: {"0xdef": "Manager"} if iid == "i-2" else {})
    assert [iv.instance_id for iv in snap.for_user("0xabc")] == ["i-1"]
    assert [iv.instance_id for iv in snap.for_user("0xDEF")] == ["i-2"]
    assert snap.for_user("nobody") == []
    assert snap.instances["i-2"].visible_to("0xDeF")
    assert not snap.instances["i-1"].visible_to("u2")
    assert snap.instances["i-1"].visible_to("0xabc")


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
