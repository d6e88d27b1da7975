"""Domains another libvirt client kept busy during the NOWAIT bulk call are asked again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from hostagent.accounting.assemble import job_skipped
from hostagent.source_model import DomainStats
from hostagent.sources.libvirt_busy import RETRY_PAUSES_S, ask_busy_again

FULL = {"state.state": 1, "balloon.current": 1048576, "balloon.rss": 204800,
        "block.count": 1, "block.0.name": "vda", "block.0.rd.bytes": 10, "block.0.wr.bytes": 20}
# What libvirt answers without the domain's job: the definition's figures only.
BUSY = {"state.state": 1, "balloon.current": 1048576, "block.count": 1, "block.0.name": "vda"}


def dom(uuid: str, stats: dict[str, Any], domid: int = 7) -> DomainStats:
    return DomainStats(uuid=uuid, name=f"vm-{uuid}", domid=domid, stats=stats, handle=uuid)


class Asker:
    """`ask(handles)` answering from a list of per-try answers (uuid -> DomainStats)."""

    def __init__(self, *tries: dict[str, DomainStats] | Exception) -> None:
        self.tries = list(tries)
        self.asked: list[list[Any]] = []

    def __call__(self, handles: list[Any]) -> Sequence[DomainStats]:
        self.asked.append(handles)
        answer = self.tries.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [answer[h] for h in handles if h in answer]


def run(domains: tuple[DomainStats, ...], asker: Asker) -> tuple[tuple[DomainStats, ...],
                                                                list[float]]:
    slept: list[float] = []
    return ask_busy_again(domains, asker, sleep=slept.append), slept


def test_the_signal_is_balloon_current_without_rss() -> None:
    assert job_skipped(BUSY)
    assert not job_skipped(FULL)
    # The test driver and a group not asked for: no balloon at all is not "busy".
    assert not job_skipped({"state.state": 1})


def test_complete_answers_are_returned_as_they_are_without_a_call() -> None:
    domains = (dom("a", FULL), dom("b", FULL))
    asker = Asker()
    got, slept = run(domains, asker)
    assert got is domains and asker.asked == [] and slept == []


def test_a_busy_domain_is_replaced_by_its_complete_answer_and_only_it_is_asked() -> None:
    domains = (dom("a", FULL), dom("b", BUSY), dom("c", FULL))
    asker = Asker({"b": dom("b", FULL)})
    got, slept = run(domains, asker)
    assert asker.asked == [["b"]]
    assert slept == [RETRY_PAUSES_S[0]]
    assert [d.uuid for d in got] == ["a", "b", "c"]
    assert got[1].stats == FULL and got[0] is domains[0] and got[2] is domains[2]


def test_still_busy_after_every_try_keeps_the_bulk_answer() -> None:
    domains = (dom("a", BUSY), dom("b", BUSY))
    asker = Asker({"a": dom("a", FULL), "b": dom("b", BUSY)}, {"b": dom("b", BUSY)})
    got, slept = run(domains, asker)
    assert asker.asked == [["a", "b"], ["b"]]  # the second try asks only what is still busy
    assert slept == list(RETRY_PAUSES_S)
    assert got[0].stats == FULL and got[1] is domains[1]


def test_an_answer_of_another_process_never_replaces_the_bulk_one() -> None:
    """The domain restarted between the calls: the new QEMU's counters are not this one's."""
    domains = (dom("a", BUSY, domid=7),)
    asker = Asker({"a": dom("a", FULL, domid=8)}, {})
    got, _ = run(domains, asker)
    assert got[0] is domains[0]


@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize("gone_in", [0, 1])
def test_a_failing_try_ends_the_retries_with_what_was_had(gone_in: int, closed: bool) -> None:
    """A domain gone between the calls (libvirtError), or the connection closed by a shutdown."""
    import libvirt

    from hostagent.errors import SourceUnavailable

    domains = (dom("a", BUSY), dom("b", BUSY))
    tries: list[dict[str, DomainStats] | Exception] = [{"a": dom("a", FULL)}] * gone_in
    tries.append(SourceUnavailable("the libvirt connection was closed") if closed
                 else libvirt.libvirtError("Domain not found"))
    got, slept = run(domains, Asker(*tries))
    assert len(slept) == gone_in + 1
    assert got[1] is domains[1]
    assert (got[0].stats == FULL) is (gone_in == 1)
