"""Tails and the ledger together, over generated histories of passes, light samples, lifecycle
reads, read failures, destroys and restarts between passes: every incarnation is billed exactly
the CPU of its last reading (pass or light sample), once, and each instance's periods tile."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent.accounting import ledger, tails
from hostagent.accounting.closeout import LightReading
from hostagent.accounting.readings import DomainReading, HostFacts, HostReading, ReadError
from hostagent.model import Baseline, DomainInfo, Owner, OwnerHint

NS = 10**9
STORE_NS = 1_000 * NS
SETTINGS = ledger.Settings(node_id="h", time_format="unix", store_created_ns=STORE_NS)
STEPS = ("pass", "pass", "light", "light", "grow", "destroy", "start", "fail")


class Everyone:
    def resolve(self, instance_id: str, hint: OwnerHint | None, *,
                build_id: str | None = None) -> Owner:
        return Owner(user_id="u", org_id=None, source="test")


@dataclass
class Vm:
    n: int
    domid: int = 0
    cpu_ns: int = 0
    started_ns: int = 0
    alive: bool = False
    failing: bool = False
    last_read: dict[str, int] = field(default_factory=dict)  # incarnation → cpu last read

    @property
    def uuid(self) -> str:
        return f"00000000-0000-0000-0000-{self.n:012d}"

    @property
    def incarnation(self) -> str:
        return f"{self.domid}:{self.domid * 7}"

    def reading(self, t_ns: int) -> DomainReading:
        info = DomainInfo(uuid=self.uuid, name=f"vm{self.n}", domid=self.domid, vcpus=1,
                          memory_bytes=1, max_memory_bytes=1)
        self.last_read[self.incarnation] = self.cpu_ns
        return DomainReading(info=info, instance_id=self.uuid, t_wall_ns=t_ns,
                             stats={"cpu.time": self.cpu_ns},
                             facts=HostFacts(pid=self.domid, start_ticks=self.domid * 7,
                                             started_wall_ns=self.started_ns, cgroup=None))


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    return draw(st.lists(st.tuples(st.sampled_from(STEPS), st.integers(0, 1),
                                   st.integers(0, 3 * NS)), min_size=1, max_size=40))


def run(history: list[tuple[str, int, int]]) -> tuple[list[Vm], list]:
    vms = [Vm(n=i) for i in range(2)]
    next_domid = 1
    t_ns = STORE_NS + 10 * NS
    state: dict[tails.Key, tails.Tail] = {}
    baselines: dict[str, Baseline] = {}
    usages = []

    def start(vm: Vm) -> None:
        nonlocal next_domid
        vm.domid, next_domid = next_domid, next_domid + 1
        vm.cpu_ns, vm.started_ns, vm.alive, vm.failing = 0, t_ns, True, False
        r = vm.reading(t_ns + 1)  # the STARTED read: a new tail's anchor
        state.setdefault((vm.uuid, vm.domid), tails.Tail.of(r))

    def do_pass() -> None:
        live = [vm for vm in vms if vm.alive]
        host = HostReading(
            t_wall_ns=t_ns, domains=tuple(vm.reading(t_ns) for vm in live if not vm.failing),
            errors=tuple(ReadError(vm.uuid, "x", "stats", "hung") for vm in live if vm.failing),
            listed={vm.uuid: "x" for vm in live})
        closing = tails.ended(state, host)
        acc, samples = ledger.account(baselines, host.domains, owners=Everyone(),
                                      settings=SETTINGS, now_ns=t_ns, closing=closing)
        usages.extend(acc.usages)
        for b in acc.baselines:
            baselines[b.instance_id] = b
        for iid in acc.removed:
            baselines.pop(iid, None)
        # As the collector does: the tails anchor on the samples the pass billed.
        state.update(tails.after_pass(state, host, [c.key for c in closing], samples))
        for k in [k for k in state if k in {c.key for c in closing}]:
            del state[k]

    for vm in vms:
        start(vm)
    for what, which, amount in history:
        t_ns += NS
        vm = vms[which]
        if what == "grow" and vm.alive:
            vm.cpu_ns += amount
        elif what == "light":
            for key, t in list(state.items()):
                owner = next(v for v in vms if v.uuid == key[0])
                alive = owner.alive and owner.domid == key[1]
                if alive:
                    owner.last_read[owner.incarnation] = owner.cpu_ns
                light = LightReading(key[0], key[1], t_ns, owner.cpu_ns if alive else None)
                state[key] = tails.with_light(t, light)
        elif what == "destroy" and vm.alive:
            vm.alive = False  # its cgroup is gone: light samples read nothing more
        elif what == "start" and not vm.alive:
            start(vm)
        elif what == "fail" and vm.alive:
            vm.failing = not vm.failing
        elif what == "pass":
            do_pass()
    for vm in vms:
        vm.alive = False
    t_ns += NS
    do_pass()  # everything ends: closed out
    assert not state
    return vms, usages


@settings(max_examples=300, deadline=None)
@given(histories())
def test_every_incarnation_is_billed_its_last_reading_once(
        history: list[tuple[str, int, int]]) -> None:
    vms, usages = run(history)
    assert len({(u.instance_id, u.incarnation, u.period_start_ns) for u in usages}) == \
        len(usages)
    by_inc: dict[tuple[str, str], int] = defaultdict(int)
    for u in usages:
        by_inc[(u.uuid, u.incarnation)] += u.cpu_ns
    for vm in vms:
        for inc, cpu in vm.last_read.items():
            assert by_inc.get((vm.uuid, inc), 0) == cpu, (vm.uuid, inc)
        mine = sorted((u for u in usages if u.uuid == vm.uuid), key=lambda u: u.period_start_ns)
        for a, b in pairwise(mine):
            assert a.period_end_ns <= b.period_start_ns  # never overlapping
            if a.incarnation == b.incarnation:
                assert a.period_end_ns == b.period_start_ns  # tiling within a process
