"""A domain whose job another libvirt client holds, on the real libvirtd (qemu:///system; a
throwaway guest of this test, never halab-*, which are only read).

Another client is made to hold the job for as long as the test wants: its QEMU is stopped
(SIGSTOP) and `virsh domstats` (without NOWAIT) takes the job and waits on the monitor. The
pass's NOWAIT bulk call then gets that domain without its monitor's figures, which is the
premise of sources/libvirt_busy.py: `balloon.current` without `balloon.rss`
(`assemble.job_skipped`)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import trio

from hostagent.accounting.assemble import job_skipped
from hostagent.clock import SystemClock
from hostagent.config.schema import LibvirtConfig
from hostagent.sources.libvirt import LibvirtSource
from tests import lab_support

pytestmark = pytest.mark.lab

SLOT = 95  # tap hatap95; no other test uses it


@pytest.fixture
def busy_guest(lab_guests: list[str]) -> Iterator[str]:
    name = f"habusy-{os.getpid() % 1000}"
    lab_support.define_extra_guest(name, SLOT)
    try:
        lab_support.start_guest(name)
        yield name
    finally:
        lab_support.remove_guest(name)


async def test_a_held_job_is_asked_again_briefly_and_never_waited_for(
        busy_guest: str, lab_guests: list[str]) -> None:
    src = LibvirtSource(LibvirtConfig(uri=lab_support.URI, call_timeout_s=5.0),
                        clock=SystemClock(), limiter=trio.CapacityLimiter(4))
    try:
        before = {d.name: d.stats for d in (await src.bulk_stats()).domains}
        # With the job, libvirt adds the QEMU process's RSS and the disks' bytes.
        assert not job_skipped(before[busy_guest]) and "block.0.wr.bytes" in before[busy_guest]
        pid = lab_support.qemu_pid(busy_guest)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        holder = None
        try:
            holder = await trio.lowlevel.open_process(
                ["virsh", "-c", lab_support.URI, "domstats", busy_guest],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # virsh connects and takes the job within milliseconds, then waits on the stopped
            # monitor until SIGCONT. Had it not by the bulk call, that call would take the job
            # itself and hang to its deadline: the path would be "per-domain" (asserted).
            await trio.sleep(3.0)
            assert holder.poll() is None, f"virsh ended: {holder.returncode}"
            t0 = time.monotonic()
            got = await src.bulk_stats()
            elapsed_s = time.monotonic() - t0
            stats = {d.name: d.stats for d in got.domains}
            assert got.path == "bulk"
            # Asked again twice, still busy: returned as libvirt gave it, well before the call's
            # 5 s deadline (waiting for the lock would last until SIGCONT; the pauses are 12 ms,
            # the rest is the other guests' TCG monitors, slow on a loaded 2-core CI machine).
            assert job_skipped(stats[busy_guest]) and "block.0.wr.bytes" not in stats[busy_guest]
            assert elapsed_s < 3.0, elapsed_s
            for name in lab_guests:  # the other domains' figures are complete
                assert not job_skipped(stats[name]) and "block.0.wr.bytes" in stats[name], name
        finally:
            os.kill(pid, signal.SIGCONT)
            if holder is not None:
                with trio.fail_after(30):
                    await holder.wait()
        after = {d.name: d.stats for d in (await src.bulk_stats()).domains}
        assert not job_skipped(after[busy_guest])
        assert after[busy_guest]["block.0.wr.bytes"] >= before[busy_guest]["block.0.wr.bytes"]
    finally:
        src.close()
