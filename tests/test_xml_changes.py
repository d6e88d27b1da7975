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
