"""The benches' CPU measure (bench/daemon_cost.py): a process's CPU in ns, exited threads included.

trio's idle worker threads exit after 10 s, so a window of a running daemon often loses a
thread; the measure must still count what that thread ran.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from daemon_cost import CpuMark, process_cpu_ns

BURN = """
import sys, threading, time
def burn(s):
    t = time.thread_time()
    while time.thread_time() - t < s:
        pass
print("ready", flush=True)
sys.stdin.readline()
for _ in range(3):
    th = threading.Thread(target=burn, args=(0.1,))
    th.start()
    th.join()
print("done", flush=True)
time.sleep(30)
"""


def test_the_cpu_of_threads_that_exited_in_the_window_is_counted() -> None:
    # The marks bracket the burning exactly (a loaded CI machine may take seconds for it).
    proc = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        before = CpuMark(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"  # three threads burned 0.1 s each, exited
        deadline = time.monotonic() + 10  # a joined thread's task may linger a moment
        while len(os.listdir(f"/proc/{proc.pid}/task")) > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        after = CpuMark(proc.pid)
        spent_s = before.until(after)
        assert 0.29 <= spent_s < 0.6, spent_s
        # The live threads' schedstat alone misses them: what the clock is for.
        assert (after.ns - before.ns) / 1e9 < 0.05
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_is_gone_has_no_clock() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert process_cpu_ns(proc.pid) is None
