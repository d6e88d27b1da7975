"""`hostagent top`, pure part: rates and CPU % from two samples, sorting, filtering, rendering."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from hostagent.cli import top_view
from hostagent.cli.top import State, on_key
from hostagent.cli.top_view import DaemonState, Row, Screen, SinkState
from hostagent.model import BlockCounters, MemoryReading, NicCounters, Pressure, Sample

T0_NS = 1_700_000_000 * 10**9


def sample(name: str, t_s: float, cpu_s: float, *, vcpus: int = 2, rx: int = 0, tx: int = 0,
           rd: int = 0, wr: int = 0, mem: int = 256 << 20, incarnation: str = "1:1",
           mac: str = "52:54:00:00:00:01") -> Sample:
    return Sample(
        instance_id=name, uuid=f"uuid-{name}", name=name, domid=1, incarnation=incarnation,
        started_wall_ns=None, t_wall_ns=T0_NS + int(t_s * 1e9), vcpus=vcpus,
        memory_alloc_bytes=1 << 30, cpu_ns=int(cpu_s * 1e9),
        memory=MemoryReading(used_bytes=mem, source="balloon"),
        nics=(NicCounters(mac=mac, ifname="hatap1", ifindex=7, guest_rx_bytes=rx,
                          guest_tx_bytes=tx, source="netlink"),),
        disks=(BlockCounters(target="vda", rd_bytes=rd, wr_bytes=wr, allocation_bytes=1,
                             capacity_bytes=2),),
        pressure=Pressure(cpu_some_avg10=1.5, memory_some_avg10=0.0, io_some_avg10=0.25))


def test_rates_and_cpu_percent_of_the_allocation() -> None:
    r = top_view.row(sample("a", 0, 10, rx=1000, tx=500, rd=0, wr=4096),
                     sample("a", 2, 11, rx=3000, tx=1500, rd=2048, wr=8192), "alice")
    assert r.cpu_percent == 25.0                 # 1 s of CPU in 2 s on 2 vCPUs
    assert (r.net_in_bytes_per_s, r.net_out_bytes_per_s) == (1000.0, 500.0)
    assert (r.disk_read_bytes_per_s, r.disk_write_bytes_per_s) == (1024.0, 2048.0)
    assert (r.memory_used_bytes, r.owner, r.pressure_io_some_avg10) == (256 << 20, "alice", 0.25)


def test_first_sight_restart_and_nic_change_give_no_rate() -> None:
    cur = sample("a", 2, 1, rx=10)
    assert top_view.row(None, cur, "").cpu_percent is None
    restarted = top_view.row(sample("a", 0, 50, incarnation="1:0"), cur, "")
    assert restarted.cpu_percent is None and restarted.disk_write_bytes_per_s is None
    renic = top_view.row(sample("a", 0, 0, mac="52:54:00:00:00:09"), cur, "")
    assert renic.net_in_bytes_per_s is None and renic.cpu_percent == 25.0


@given(cpu_s=st.floats(0, 1e6), busy_s=st.floats(0, 100), dt_s=st.floats(0.1, 100),
       vcpus=st.integers(1, 64))
def test_cpu_percent_is_busy_time_over_allocation(cpu_s: float, busy_s: float, dt_s: float,
                                                  vcpus: int) -> None:
    a, b = sample("a", 0, cpu_s, vcpus=vcpus), sample("a", dt_s, cpu_s + busy_s, vcpus=vcpus)
    r = top_view.row(a, b, "")
    assert r.cpu_percent is not None
    expected = (b.cpu_ns - a.cpu_ns) / ((b.t_wall_ns - a.t_wall_ns) * vcpus) * 100  # type: ignore[operator]
    assert abs(r.cpu_percent - expected) <= 1e-9 * max(1.0, expected)
    t = top_view.totals([r], host_cpus=4)
    assert t.cpu_percent_of_host is not None
    assert abs(t.cpu_percent_of_host - r.cpu_percent * vcpus / 4) <= 1e-9 * max(1.0, expected)


def rows3() -> tuple[Row, ...]:
    prev = {s.uuid: s for s in (sample("web", 0, 0), sample("db", 0, 0), sample("ci", 0, 0))}
    cur = [sample("web", 1, 0.2, rx=100, mem=300 << 20),
           sample("db", 1, 1.5, wr=10 << 20, mem=900 << 20),
           sample("ci", 1, 0.1, tx=10 << 20, mem=100 << 20)]
    return top_view.rows(prev, cur, {"uuid-web": "alice", "uuid-db": "bob", "uuid-ci": "alice"})


def test_sort_keys_and_filter_by_name_or_owner() -> None:
    rs = rows3()
    names = {k: [r.name for r in top_view.arrange(rs, k)] for k in "cmdn"}  # type: ignore[arg-type]
    assert names == {"c": ["db", "web", "ci"], "m": ["db", "web", "ci"],
                     "d": ["db", "ci", "web"], "n": ["ci", "web", "db"]}
    assert [r.name for r in top_view.arrange(rs, "c", "ALICE")] == ["web", "ci"]
    assert [r.name for r in top_view.arrange(rs, "c", "d")] == ["db"]
    assert top_view.arrange(rs, "c", "nobody") == ()


def screen(rs: tuple[Row, ...], daemon: DaemonState | None = None) -> Screen:
    return Screen(T0_NS + 10**9, 2.0, 2, rs, top_view.totals(rs, 2),
                  daemon or DaemonState("/x/state.db", False, "no state store"))


def test_render_shows_header_rows_and_daemon_state() -> None:
    d = DaemonState("/x/state.db", True, None, T0_NS - 29 * 10**9, 1.0,
                    (SinkState("queue", 12, 95.0, 3, "open (since 2023-11-14T22:13:00Z)"),),
                    unattributed_cpu_s=4.5)
    console = Console(width=160, record=True)
    console.print(top_view.render(screen(rows3(), d), "c", "alice"))
    text = console.export_text()
    assert "host: 3 domains  6 vCPUs on 2 CPUs" in text
    assert "last pass 30s ago" in text
    assert "backlog 12 (oldest 95s)" in text
    assert "breakers queue=open" in text
    assert "dead letters 3" in text and "unattributed CPU 4.5s" in text
    body = [line.split()[0] for line in text.splitlines()[4:] if line[:1].isalpha()]
    assert body[:2] == ["web", "ci"]                # filtered on the owner, sorted by CPU
    assert "db " not in text


def test_no_unattributed_cpu_line_without_the_metric() -> None:
    d = DaemonState("/x/state.db", True, None, None, None, ())
    lines = top_view.header_lines(screen(rows3(), d), "c", "")
    assert "no pass yet" in lines[2] and "unattributed" not in lines[2]


def test_json_document_shape() -> None:
    doc = top_view.as_json(screen(rows3()), "m", "")
    assert set(doc) == {"time", "interval_s", "host", "daemon", "sort", "filter", "domains",
                        "errors"}
    assert doc["sort"] == "memory"
    assert [d["name"] for d in doc["domains"]] == ["db", "web", "ci"]
    assert set(doc["domains"][0]) == set(Row.__dataclass_fields__)
    assert doc["host"]["domains"] == 3 and doc["host"]["cpus"] == 2


def test_keys_sort_filter_and_quit() -> None:
    state = State("c", "")
    for ch in "m/ali\x7fi\r":
        assert on_key(state, ch)
    assert (state.key, state.text, state.prompt) == ("m", "ali", None)
    assert on_key(state, "\x1b") and state.text == ""
    assert not on_key(state, "q")


def test_human_bytes() -> None:
    assert [top_view.human_bytes(x) for x in (None, 0, 1023, 1536, 5 << 30)] == [
        "-", "0", "1023", "1.5K", "5.0G"]
    assert top_view.human_bytes(2048.0, per_s=True) == "2.0K/s"


def test_json_says_why_each_reading_is_missing() -> None:
    """A disk libvirt answered without bytes (its job was busy): `missing` names the reading,
    `missing_why` gives the reason, as `dump` does."""
    import dataclasses

    from hostagent.accounting.assemble import JOB_BUSY

    busy = dataclasses.replace(
        sample("db", 1, 1.5), disks=(BlockCounters("vda", None, None, None, None),),
        missing={"disk:vda:rd_bytes": JOB_BUSY, "disk:vda:wr_bytes": JOB_BUSY})
    r = top_view.row(sample("db", 0, 0), busy, "bob")
    (doc,) = top_view.as_json(screen((r,)), "c", "")["domains"]
    assert doc["disk_write_bytes"] is None and doc["disk_write_bytes_per_s"] is None
    assert doc["missing"] == ["disk:vda:rd_bytes", "disk:vda:wr_bytes"]
    assert doc["missing_why"] == {"disk:vda:rd_bytes": JOB_BUSY, "disk:vda:wr_bytes": JOB_BUSY}


def test_untrusted_strings_are_shown_verbatim_on_one_line() -> None:
    """Names, owners, errors and the filter never reach rich as markup, and control characters
    are escaped: `alice[/]` raised MarkupError, `vm[bold]x` showed as `vmx`, a newline split
    the row, ESC reached the terminal."""
    names = ["vm[bold]x", "[bold red]red[not closed", "new\nline", "esc\x1b[31mred"]
    prev = {s.uuid: s for s in (sample(n, 0, 0) for n in names)}
    rs = top_view.rows(prev, [sample(n, 1, 0.5) for n in names],
                       {f"uuid-{n}": "alice[/]" for n in names})
    d = DaemonState("/x/state.db", True, None, None, None,
                    (SinkState("q[/]", 0, None, 0, "closed\x1b[2J"),))
    scr = Screen(T0_NS, 2.0, 2, rs, top_view.totals(rs, 2), d, ("bad [/] news\nline 2",))
    for interactive in (True, False):
        console = Console(width=200, record=True, color_system=None)
        console.print(top_view.render(scr, "n", "", prompt="f[/]\x07",
                                      interactive=interactive))
        text = console.export_text()
        assert "\x1b" not in text and "\x07" not in text
        body = [line for line in text.splitlines() if "alice[/]" in line]
        assert sorted(line.split()[0] for line in body) == [
            "[bold", "esc\\x1b[31mred", "new\\nline", "vm[bold]x"]
        assert any(line.startswith("[bold red]red[not closed ") for line in body)
        assert "error: bad [/] news\\nline 2" in text
        assert "breakers q[/]=closed\\x1b[2J" in text
        assert ("filter: f[/]\\x07_" in text) == interactive  # the prompt being typed
    console = Console(width=200, record=True)
    console.print(top_view.render(scr, "c", "\x1b[/]"))
    assert "filter: \\x1b[/]" in console.export_text()


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    assert top_view.printable("plain [b] name") == "plain [b] name"
    assert top_view.printable("a\tb\r\n\x7f\x85\u202e\u2028\xa0z") == (
        "a\\tb\\r\\n\\x7f\\x85\\u202e\\u2028 z")
