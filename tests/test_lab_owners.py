"""Owners end to end: lab guests, the real daemon, and the stand-in account service, with an
outage in the middle (issue 5)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import lab_support
from tests.standins.accounts import account, serve_accounts
from tests.test_lab import DaemonProc, events_for, wait_for, write_config

pytestmark = pytest.mark.lab

ALICE = "a1" * 20   # owns the even lab guest (it has no owner in its metadata)
BOB = "b0" * 20     # will own the guest started during the outage


def test_owners_survive_an_outage_and_new_guests_get_theirs_after_it(
        tmp_path: Path, lab_guests: list[str]) -> None:
    with_meta, without_meta = lab_guests[0], lab_guests[1]   # odd guests carry metadata
    newcomer = f"hatest-own-{tmp_path.name[-6:]}"
    lab_support.define_extra_guest(newcomer, 92)  # even: no metadata owner
    try:
        with serve_accounts([account(ALICE, owned=[lab_support.domain_uuid(without_meta)])]
                            ) as svc:
            cfg = write_config(tmp_path, extra=f"""
[owners]
enabled = true
url = "{svc.url}"
refresh_s = 1
timeout_s = 1
lookups_per_s = 5
""")
            path = tmp_path / "events.jsonl"
            d = DaemonProc(cfg, tmp_path / "daemon.log")
            try:
                wait_for(lambda: any(e["user_id"] == ALICE
                                     for e in events_for(path, without_meta)), 60,
                         "the account service's owner on an event")
                svc.stop()                                    # outage
                seen = len(events_for(path, without_meta))
                lab_support.start_guest(newcomer)
                wait_for(lambda: len(events_for(path, without_meta)) >= seen + 3
                         and len(events_for(path, newcomer)) >= 1, 90,
                         "events during the outage")
                during = events_for(path, without_meta)[seen:]
                assert {e["user_id"] for e in during} == {ALICE}   # last known owner kept
                assert events_for(path, newcomer)[0]["user_id"] == "unassigned"
                with svc.lock:
                    svc.accounts.append(account(BOB,
                                                owned=[lab_support.domain_uuid(newcomer)]))
                svc.start()                                   # back, same port
                wait_for(lambda: events_for(path, newcomer)[-1]["user_id"] == BOB, 60,
                         "the newcomer's owner once the service is back")
            finally:
                assert d.stop() == 0
        # metadata wins over the service for guests that carry it
        meta_events = events_for(path, with_meta)
        assert meta_events
        assert {e["owner_source"] for e in meta_events} == {"metadata:hostagent"}
        assert {e["user_id"] for e in meta_events} == {"lab-user-1"}
    finally:
        lab_support.remove_guest(newcomer)
