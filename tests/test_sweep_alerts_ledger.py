"""Threshold alerts through the pass's pure accounting step (`ledger.account`): a domain
restarted between two passes reports twice in one pass, and a domain that stops while its
alert fires. The simulated domain (`Vm`) is test_ledger's."""

from __future__ import annotations

import orjson

from hostagent import pass_reads
from hostagent.accounting import ledger
from hostagent.accounting.closeout import Closing, LightReading
from hostagent.accounting.readings import HostReading, ReadError
from hostagent.alerts.index import Settings, build_index
from hostagent.alerts.rules import parse_rule
from hostagent.alerts.state import AlertState
from tests.accounting.test_ledger import NS, SETTINGS, STORE_NS, Everyone, Vm

# CPU seconds in one period: the close-out's 3 s and the new incarnation's 2 s both reach it.
RULE = parse_rule({"id": "cpu-s", "resource_type": "Cpu", "action": "Alert", "user_id": "*",
                   "threshold_type": {"Absolute": {"value": 1, "unit": "seconds"}}})
INDEX = build_index([RULE], Settings(repeat_interval_s=0))


def alerts(acc: ledger.Accounting) -> list[tuple[str, str, str]]:
    docs = [orjson.loads(e.payload) for e in acc.events if e.kind == "threshold_violation"]
    return [(d["transition"], d["reason"], d["instance_id"]) for d in docs]


def test_a_domain_restarted_between_passes_fires_once() -> None:
    """Destroyed and started again between two passes: the pass bills the old incarnation's
    close-out and the new one's first period, both over the threshold. One crossing, one
    `exceeded` (before: two, one per usage, each stepped from the pass's starting state)."""
    vm = Vm(n=1, domid=10, ticks=500, started_ns=STORE_NS + NS)
    t0 = STORE_NS + 10 * NS
    acc, _ = ledger.account({}, [vm.reading(t0)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t0, rules=INDEX, alert_states={})
    baselines = {b.instance_id: b for b in acc.baselines}
    states: dict[str, AlertState] = dict(acc.alert_states)
    vm.cpu_ns += 3 * NS
    anchor = vm.reading(t0)
    light = LightReading(uuid=vm.uuid, domid=vm.domid, t_wall_ns=t0 + 20 * NS, cpu_ns=vm.cpu_ns)
    vm.domid, vm.ticks, vm.started_ns, vm.cpu_ns = 11, 900, t0 + 25 * NS, 2 * NS
    t1 = t0 + 30 * NS
    acc, _ = ledger.account(baselines, [vm.reading(t1)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t1, closing=[Closing(anchor, light, reason="DESTROYED")],
                            rules=INDEX, alert_states=states)
    assert len(acc.usages) == 2
    assert alerts(acc) == [("exceeded", "value", vm.uuid)]
    (st,) = acc.alert_states.values()
    assert (st.status, st.notified) == ("exceeded", "exceeded")


def test_a_domain_that_stops_while_firing_resolves_its_alert() -> None:
    """The close-out's usage is evaluated like any other; then, the instance gone, its open
    alert resolves ("instance stopped") and its state goes. Before, it got no notice at all,
    no repeat and no resolve, until its baseline expired (`collector.baseline_retention_s`,
    30 days), when it was dropped without a word: open on dashboards for a month."""
    vm = Vm(n=2, domid=10, ticks=500, started_ns=STORE_NS + NS)
    t0 = STORE_NS + 10 * NS
    acc, _ = ledger.account({}, [vm.reading(t0)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t0, rules=INDEX, alert_states={})
    assert alerts(acc) == []
    baselines = {b.instance_id: b for b in acc.baselines}
    vm.cpu_ns += 20 * NS
    acc, _ = ledger.account(baselines, [vm.reading(t0 + 30 * NS)], owners=Everyone(),
                            settings=SETTINGS, now_ns=t0 + 30 * NS, rules=INDEX,
                            alert_states=dict(acc.alert_states))
    assert alerts(acc) == [("exceeded", "value", vm.uuid)]
    baselines = {b.instance_id: b for b in acc.baselines}
    anchor = vm.reading(t0 + 30 * NS)
    vm.cpu_ns += 10 * NS
    light = LightReading(uuid=vm.uuid, domid=vm.domid, t_wall_ns=t0 + 50 * NS, cpu_ns=vm.cpu_ns)
    acc, _ = ledger.account(baselines, [], owners=Everyone(), settings=SETTINGS,
                            now_ns=t0 + 60 * NS, closing=[Closing(anchor, light,
                                                                  reason="DESTROYED")],
                            rules=INDEX, alert_states=dict(acc.alert_states))
    assert len(acc.usages) == 1  # the last period is billed (and evaluated: it fired too)
    assert alerts(acc) == [("resolved", "instance stopped", vm.uuid)]  # the VM is no more
    assert dict(acc.alert_states) == {}
    states = dict(acc.alert_states)
    baselines = {b.instance_id: b for b in acc.baselines}
    for k in range(2, 6):  # gone: nothing more
        acc, _ = ledger.account(baselines, [], owners=Everyone(), settings=SETTINGS,
                                now_ns=t0 + k * 30 * NS, rules=INDEX, alert_states=states)
        assert alerts(acc) == [] and dict(acc.alert_states) == {}


def test_counters_reset_by_a_reboot_neither_fire_nor_resolve_spuriously() -> None:
    """A new QEMU process between passes (counters back to zero): the new incarnation is billed
    from its own zero, so the firing alert follows the real value: it keeps firing, without
    a second `exceeded`, while the new process is busy, and resolves once when it is idle.
    Never a negative or huge delta that would fire or resolve by itself."""
    vm = Vm(n=3, domid=10, ticks=500, started_ns=STORE_NS + NS)
    t0 = STORE_NS + 10 * NS
    acc, _ = ledger.account({}, [vm.reading(t0)], owners=Everyone(), settings=SETTINGS,
                            now_ns=t0, rules=INDEX, alert_states={})
    seen: list[tuple[str, str, str]] = []
    t = t0
    for step in ("busy", "reboot-busy", "busy", "reboot-idle", "idle"):
        baselines = {b.instance_id: b for b in acc.baselines}
        t += 30 * NS
        if step.startswith("reboot"):
            vm.domid, vm.ticks, vm.cpu_ns = vm.domid + 1, vm.ticks + 1, 0
            vm.started_ns = t - 10 * NS
        vm.cpu_ns += 5 * NS if step.endswith("busy") else NS // 10
        acc, _ = ledger.account(baselines, [vm.reading(t)], owners=Everyone(),
                                settings=SETTINGS, now_ns=t, rules=INDEX,
                                alert_states=dict(acc.alert_states))
        assert all(u.cpu_ns >= 0 for u in acc.usages)
        seen += [(step, k, r) for k, r, _ in alerts(acc)]
    assert seen == [("busy", "exceeded", "value"), ("reboot-idle", "resolved", "value")]


def test_a_domain_gone_while_the_daemon_was_down_resolves_once_a_pass_reads_every_domain(
        ) -> None:
    """No close-out tells of a VM that stopped while the daemon was down. A pass that read
    every running domain (`complete`) and not that one resolves its open alert ("instance
    stopped", at its last committed reading); a pass that could not read some domain
    (`complete` False) changes nothing, since the VM may be the one it missed."""
    vm = Vm(n=4, domid=10, ticks=500, started_ns=STORE_NS + NS)
    other = Vm(n=5, domid=11, ticks=600, started_ns=STORE_NS + NS)
    t0 = STORE_NS + 10 * NS
    acc, _ = ledger.account({}, [vm.reading(t0), other.reading(t0)], owners=Everyone(),
                            settings=SETTINGS, now_ns=t0, rules=INDEX, alert_states={})
    vm.cpu_ns += 20 * NS
    other.cpu_ns += 20 * NS
    acc, _ = ledger.account({b.instance_id: b for b in acc.baselines},
                            [vm.reading(t0 + 30 * NS), other.reading(t0 + 30 * NS)],
                            owners=Everyone(), settings=SETTINGS, now_ns=t0 + 30 * NS,
                            rules=INDEX, alert_states={})
    assert sorted(alerts(acc)) == sorted([("exceeded", "value", vm.uuid),
                                          ("exceeded", "value", other.uuid)])
    baselines = {b.instance_id: b for b in acc.baselines}
    states = dict(acc.alert_states)
    t1 = t0 + 3_600 * NS  # the daemon back an hour later; `vm` is gone, `other` idles on
    other.cpu_ns += NS // 2
    acc, _ = ledger.account(baselines, [other.reading(t1)], owners=Everyone(),
                            settings=SETTINGS, now_ns=t1, rules=INDEX, alert_states=states)
    assert alerts(acc) == [("resolved", "value", other.uuid)]  # not complete: `vm` stays
    assert {s.instance_id for s in acc.alert_states.values()} == {vm.uuid}
    baselines = {b.instance_id: b for b in acc.baselines} | {vm.uuid: baselines[vm.uuid]}
    states = dict(acc.alert_states)
    other.cpu_ns += NS // 2
    acc, _ = ledger.account(baselines, [other.reading(t1 + 30 * NS)], owners=Everyone(),
                            settings=SETTINGS, now_ns=t1 + 30 * NS, rules=INDEX,
                            alert_states=states, complete=True)
    assert alerts(acc) == [("resolved", "instance stopped", vm.uuid)]
    doc = next(orjson.loads(e.payload) for e in acc.events if e.kind == "threshold_violation")
    assert doc["period"]["end"] == doc["period"]["start"]  # its last reading, not now
    assert dict(acc.alert_states) == {}
    assert [u.instance_id for u in acc.usages] == [other.uuid]  # nothing billed for it
    acc, _ = ledger.account(baselines, [other.reading(t1 + 60 * NS)], owners=Everyone(),
                            settings=SETTINGS, now_ns=t1 + 60 * NS, rules=INDEX,
                            alert_states={}, complete=True)
    assert alerts(acc) == []


def test_a_pass_has_read_every_running_domain_only_without_a_read_error() -> None:
    """What the collector passes as `complete`: every listed domain read, no read error."""
    t = STORE_NS + 10 * NS
    a = Vm(n=6, domid=10, ticks=500, started_ns=STORE_NS + NS).reading(t)
    b = Vm(n=7, domid=11, ticks=600, started_ns=STORE_NS + NS).reading(t)
    listed = {a.info.uuid: "a", b.info.uuid: "b"}
    assert pass_reads.read_every_running(HostReading(t, (a, b), listed=listed))
    assert not pass_reads.read_every_running(HostReading(t, (a,), listed=listed))
    failed = (ReadError(b.info.uuid, "b", "xml", "unreadable"),)
    assert not pass_reads.read_every_running(HostReading(t, (a,), failed, listed=listed))
    assert not pass_reads.read_every_running(HostReading(t, (a, b), failed, listed=listed))
    assert pass_reads.read_every_running(HostReading(t, ()))  # nothing runs
