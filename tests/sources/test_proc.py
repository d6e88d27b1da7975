"""proc.pid_of: libvirt's pid file `<run dir>/<name>.pid` for any name libvirt accepts ("." and
".." included: "..pid" and "...pid" are plain names inside the run directory), and nothing
for a name that could leave that directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hostagent.cli.main import main
from hostagent.sources import cgroup, proc
from hostagent.sources.files import HostRoot
from tests.cli.test_dump import dump_config

HOSTS = Path(__file__).parents[2] / "fixtures" / "hosts"
RUN = "run/libvirt/qemu"


@pytest.mark.parametrize(("name", "file"), [(".", "..pid"), ("..", "...pid"),
                                            ("...", "....pid"), (".hidden", ".hidden.pid"),
                                            ("a..b", "a..b.pid")])
def test_dot_names_read_libvirts_pid_file(tmp_path: Path, name: str, file: str) -> None:
    (tmp_path / RUN).mkdir(parents=True)
    (tmp_path / RUN / file).write_text("4242\n")
    assert proc.pid_of(HostRoot(tmp_path), name) == 4242


@pytest.mark.parametrize("name", ["", "/", "../qemu/ok", "ok/..", "..\x00", "ok\x00", "\x00"])
def test_names_that_could_leave_the_run_dir_have_no_pid(tmp_path: Path, name: str) -> None:
    (tmp_path / RUN).mkdir(parents=True)
    for file in ("ok.pid", ".pid", "...pid"):
        (tmp_path / RUN / file).write_text("4242\n")
    (tmp_path / "run/libvirt/ok.pid").write_text("13\n")  # where "../ok" would lead
    assert proc.pid_of(HostRoot(tmp_path), name) is None


def test_a_domain_named_dot_dot_is_located_on_a_recorded_host(tmp_path: Path) -> None:
    shutil.copytree(HOSTS / "systemd-v2" / "t0", tmp_path / "root")
    meta = json.loads((HOSTS / "systemd-v2" / "meta.json").read_text())
    g = next(g for g in meta["guests"] if g["name"] == "vm-beta")
    run = tmp_path / "root" / RUN
    (run / "vm-beta.pid").rename(run / "...pid")  # as libvirt names it for a domain ".."
    root = HostRoot(tmp_path / "root")
    pid = proc.pid_of(root, "..")
    assert pid is not None and pid == g["qemu_pid"]
    assert proc.process_start_ticks(root, pid) is not None
    paths = cgroup.locate(root, "/sys/fs/cgroup", pid)
    assert paths is not None and paths.cpu is not None


def test_dump_of_a_domain_named_dot_dot_reads_its_cgroup(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # libvirt's test driver runs a domain "..": its QEMU is vm-beta's of the recorded host
    shutil.copytree(HOSTS / "systemd-v2" / "t0", tmp_path / "root")
    run = tmp_path / "root" / RUN
    (run / "vm-beta.pid").rename(run / "...pid")
    node = tmp_path / "node.xml"
    node.write_text("""<node><domain type='test'>
  <name>..</name><uuid>22222222-2222-4222-8222-222222222222</uuid>
  <memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os>
</domain></node>
""")
    config = dump_config(tmp_path, node)
    rc = main(["dump", "..", "--json", "--interval", "0.05", "--config", str(config)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["domain"]["name"] == ".."
    assert doc["missing"] == {}
    cpu = next(c for c in doc["counters"] if c["name"] == "cpu_time")
    assert cpu["source"] == "cgroup cpu.stat usage_usec" and cpu["value"] is not None
