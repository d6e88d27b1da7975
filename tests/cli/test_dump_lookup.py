"""dump: which domain a DOMAIN argument names (name, UUID, libvirt id, a case-insensitive name
only when unambiguous), the `--json` shapes with `--host`, no running domain, and a libvirt
that accepts the connection but never answers."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from hostagent.cli.dump import find_domain, host_doc, render_text
from hostagent.cli.main import main
from hostagent.errors import DomainNotFound

REPO = Path(__file__).resolve().parents[2]
# The test driver gives running domains the ids 1, 2, ... in node order: "34" has id 3.
DOMAINS = ("web", "Web", "34", "db")


def uuid_of(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"


def node(tmp: Path, names: Sequence[str]) -> Path:
    doms = "".join(f"""
  <domain type='test'><name>{name}</name><uuid>{uuid_of(i)}</uuid>
    <memory>1048576</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"""
                   for i, name in enumerate(names, start=1))
    path = tmp / "node.xml"
    path.write_text(f"<node>{doms}\n</node>\n")
    return path


def config(tmp: Path, uri: str, extra: str = "") -> str:
    (tmp / "root").mkdir(exist_ok=True)
    cfg = tmp / "h.toml"
    cfg.write_text(f'[libvirt]\nuri = "{uri}"\n{extra}[paths]\nroot = "{tmp / "root"}"\n'
                   f'[collector]\nstate_path = "{tmp}/state.db"\n'
                   f'[[sinks]]\ntype = "jsonl"\npath = "{tmp}/e.jsonl"\n')
    return str(cfg)


@pytest.fixture
def cfg(tmp_path: Path) -> str:
    return config(tmp_path, f"test://{node(tmp_path, DOMAINS)}")


def dump_json(cfg: str, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    rc = main(["dump", *args, "--json", "--interval", "0.05", "--config", cfg])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return orjson.loads(out)


@pytest.mark.parametrize(("arg", "name"), [
    ("db", "db"), (uuid_of(4).upper(), "db"), ("4", "db"),   # name, UUID in any case, id
    ("34", "34"), ("3", "34"),        # a domain named "34" wins over id 34 (there is none)
    ("DB", "db"),                     # one name in another case: unambiguous
])
def test_a_domain_is_found_by_name_uuid_or_id(cfg: str, capsys: pytest.CaptureFixture[str],
                                              arg: str, name: str) -> None:
    doc = dump_json(cfg, capsys, arg)
    assert isinstance(doc, dict) and doc["domain"]["name"] == name


def test_a_name_wins_over_an_id() -> None:
    listed = {uuid_of(1): "2", uuid_of(2): "other"}
    ids = {uuid_of(1): 7, uuid_of(2): 2}
    assert find_domain("2", listed, ids) == uuid_of(1)
    assert find_domain("7", listed, ids) == uuid_of(1)
    with pytest.raises(DomainNotFound, match="or with that UUID or id"):
        find_domain("3", listed, ids)


def test_a_name_in_another_case_matching_several_is_a_usage_error(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `dump WEB` used to pick `web` silently with `Web` running too
    assert main(["dump", "WEB", "--interval", "0.05", "--config", cfg]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "'WEB'" in err and "'Web', 'web'" in err and "Traceback" not in err
    assert dump_json(cfg, capsys, "Web")["domain"]["name"] == "Web"


def test_host_json_with_one_domain_keeps_the_host_document(
        cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `dump DOMAIN --host --json` printed the domain's object and dropped the host document
    one = dump_json(cfg, capsys, "db", "--host")
    assert isinstance(one, list) and len(one) == 2
    assert one[0]["domain"]["name"] == "db" and set(one[1]) == {"host"}
    two = dump_json(cfg, capsys, "db", "web", "--host")
    assert isinstance(two, list) and [set(d) == {"host"} for d in two] == [False, False, True]
    assert set(dump_json(cfg, capsys, "--host")) == {"host"}
    assert set(dump_json(cfg, capsys, "db")) >= {"domain", "counters", "event"}


def test_no_running_domain_is_said_and_the_host_interval_is_true(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config(tmp_path, f"test://{node(tmp_path, ())}")
    assert main(["dump", "--all", "--interval", "0.05", "--config", cfg]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no running domains" in err
    assert dump_json(cfg, capsys, "--all") == []
    (host,) = dump_json(cfg, capsys, "--all", "--host")
    assert host["host"]["domains"] == 0 and host["host"]["interval_s"] >= 0.05
    text = render_text([host_doc("/x/cpu.stat", (0, 10**6), [], [], interval_s=1.5)])
    assert "0 domains over 1.50 s" in text
    text = render_text([host_doc("/x/cpu.stat", (0, 10**6), [], [])])
    assert "over an unknown interval" in text and "0.00 s" not in text


@pytest.fixture
def silent_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket that accepts connections and never writes a byte."""
    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(srv.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield path
    finally:
        srv.close()
        for conn in held:
            conn.close()


def test_a_libvirt_that_never_answers_is_named_by_its_uri(
        tmp_path: Path, silent_socket: Path) -> None:
    uri = f"qemu+unix:///system?socket={silent_socket}"
    cfg = config(tmp_path, uri, "call_timeout_s = 0.5\n")
    got = subprocess.run([sys.executable, "-m", "hostagent.cli", "--config", cfg, "dump", "vm"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert got.returncode == 1
    last = got.stderr.strip().splitlines()[-1]
    assert last == f"hostagent: libvirt at {uri} did not answer within 0.5 s", got.stderr
    assert "_default_connector" not in got.stderr and "Traceback" not in got.stderr


def test_a_uuid_wins_over_a_name_spelled_like_it_and_the_running_list_is_one_line() -> None:
    # as virsh: a domain named like another's UUID does not hide that domain
    listed = {uuid_of(1): "a", uuid_of(2): uuid_of(1), uuid_of(3): "two\nlines"}
    assert find_domain(uuid_of(1), listed, {}) == uuid_of(1)
    assert find_domain(uuid_of(1).upper(), listed, {}) == uuid_of(1)
    with pytest.raises(DomainNotFound) as err:
        find_domain("nope", listed, {})
    assert "\n" not in str(err.value) and "'two\\nlines'" in str(err.value)
    many = {uuid_of(i): f"vm-{i:03d}" for i in range(30)}
    with pytest.raises(DomainNotFound, match=r"'vm-019' and 10 more$"):
        find_domain("nope", many, {})
