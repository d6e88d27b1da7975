"""XmlChanges: what libvirt's XML change events told, from its event thread to the next pass."""

from __future__ import annotations

import threading

from hostagent.xml_changes import XmlChanges


def test_told_uuids_are_taken_once_lowercased_and_hearing_asks_for_every_domain() -> None:
    x = XmlChanges()
    assert x.take() == (set(), False) and not x.heard
    x.tell("ABC")
    x.tell("abc")
    assert x.take() == ({"abc"}, False)
    assert x.take() == (set(), False)
    x.hear(True)
    assert x.heard and x.take() == (set(), True)
    assert x.take() == (set(), False)
    x.hear(False)
    assert not x.heard and x.take() == (set(), False)


def test_changes_told_from_another_thread_are_never_lost() -> None:
    x = XmlChanges()
    uuids = [f"{i:08d}-0000-0000-0000-000000000000" for i in range(2000)]
    told = threading.Event()

    def tell() -> None:
        for u in uuids:
            x.tell(u)
        told.set()

    thread = threading.Thread(target=tell)
    thread.start()
    got: list[str] = []
    while not told.is_set():
        got.extend(x.take()[0])
    thread.join()
    got.extend(x.take()[0])
    assert sorted(got) == uuids  # each exactly once


def test_hostdev_changes_keep_their_last_time_until_the_pass_that_reads_them() -> None:
    """A hostdev added or removed leaves when it was heard (the GPU split,
    accounting/gpu_change.py); other devices and metadata edits leave only the UUID; a pass
    takes the times with the UUIDs, and its commit keeps only those of domains it failed."""
    x = XmlChanges()
    x.tell("AAA", "hostdev0", 10)
    x.tell("aaa", "hostdev1", 20)  # the last one wins
    x.tell("bbb", "net1", 30)
    x.tell("ccc", "ua-gpu", 40)  # a user alias: its kind is unknown, no time kept
    x.tell("ddd", "hostdev0", 50)
    x.tell("eee")  # a metadata edit
    assert x.hostdev_changes == {}  # not before the pass takes them
    assert x.take() == ({"aaa", "bbb", "ccc", "ddd", "eee"}, False)
    assert x.hostdev_changes == {"aaa": 20, "ddd": 50}
    x.tell("aaa", "hostdev0", 60)  # heard after the take: the next pass's
    x.settled({"ddd"})  # the pass read aaa and failed ddd
    assert x.hostdev_changes == {"ddd": 50}
    x.take()
    assert x.hostdev_changes == {"ddd": 50, "aaa": 60}
    x.settled(set())
    assert x.hostdev_changes == {}
