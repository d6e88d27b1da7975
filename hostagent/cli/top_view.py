"""`hostagent top`, the pure part: rows from two samples, sorting, filtering, JSON and rendering.

Nothing here reads the host or the store: `top.py` hands in samples and the daemon's state.
Rates are per second between the two samples of one domain; a domain seen for the first time
(or restarted: a new incarnation) has counters but no rates yet.

Names, owners, errors and filter text come from guests' owners, libvirt and the person typing:
they reach rich only as `Text` (never parsed as markup) and through `printable` (control and
format characters escaped, so a name cannot split a row or move the cursor).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from hostagent.model import Sample

SortKey = Literal["c", "m", "d", "n"]
SORT_KEYS: Mapping[str, str] = {"c": "CPU", "m": "memory", "d": "disk", "n": "network"}


@dataclass(frozen=True, slots=True)
class Row:
    """One running domain as `top` shows it."""

    name: str
    uuid: str
    owner: str
    vcpus: int
    cpu_percent: float | None  # of the domain's allocation (100 % = every vCPU busy)
    memory_used_bytes: int | None
    memory_alloc_bytes: int
    disk_read_bytes_per_s: float | None
    disk_write_bytes_per_s: float | None
    net_in_bytes_per_s: float | None  # guest ingress (host tap tx)
    net_out_bytes_per_s: float | None  # guest egress (host tap rx)
    gpus: int
    pressure_cpu_some_avg10: float | None
    pressure_memory_some_avg10: float | None
    pressure_io_some_avg10: float | None
    cpu_ns: int | None
    net_in_bytes: int
    net_out_bytes: int
    disk_read_bytes: int | None
    disk_write_bytes: int | None
    missing: tuple[str, ...] = ()
    # (reading, why) of each `missing` reading, in the same order (`top --json`: missing_why).
    missing_why: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SinkState:
    """One sink as the daemon last recorded it in the state store."""

    name: str
    pending: int
    oldest_pending_age_s: float | None
    dead_letters: int
    breaker: str


@dataclass(frozen=True, slots=True)
class DaemonState:
    """What the state store (read-only) and the daemon's /metrics say; None: unknown."""

    store_path: str
    available: bool
    reason: str | None = None
    last_pass_wall_ns: int | None = None
    delivery_heartbeat_age_s: float | None = None
    sinks: tuple[SinkState, ...] = ()
    unattributed_cpu_s: float | None = None


@dataclass(frozen=True, slots=True)
class Totals:
    """Host totals over the shown rows' source (all running domains)."""

    domains: int
    vcpus: int
    memory_alloc_bytes: int
    memory_used_bytes: int
    cpu_percent_of_host: float | None  # 100 % = every host CPU busy with guests
    disk_read_bytes_per_s: float
    disk_write_bytes_per_s: float
    net_in_bytes_per_s: float
    net_out_bytes_per_s: float
    gpus: int


@dataclass(frozen=True, slots=True)
class Screen:
    """Everything one refresh shows."""

    t_wall_ns: int
    interval_s: float | None
    host_cpus: int
    rows: tuple[Row, ...]
    totals: Totals
    daemon: DaemonState
    errors: tuple[str, ...] = field(default=())


def _rate(a: int | None, b: int | None, dt_s: float) -> float | None:
    if a is None or b is None or dt_s <= 0 or b < a:
        return None
    return (b - a) / dt_s


def _sum(values: Sequence[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def row(prev: Sample | None, cur: Sample, owner: str) -> Row:
    """One row; rates only against a previous sample of the same incarnation."""
    p = prev if prev is not None and prev.incarnation == cur.incarnation else None
    dt_s = (cur.t_wall_ns - p.t_wall_ns) / 1e9 if p is not None else 0.0
    cpu_rate = _rate(p.cpu_ns if p else None, cur.cpu_ns, dt_s)
    rd, wr = _sum([d.rd_bytes for d in cur.disks]), _sum([d.wr_bytes for d in cur.disks])
    p_rd = _sum([d.rd_bytes for d in p.disks]) if p else None
    p_wr = _sum([d.wr_bytes for d in p.disks]) if p else None
    net_in = sum(n.guest_rx_bytes for n in cur.nics)
    net_out = sum(n.guest_tx_bytes for n in cur.nics)
    same_nics = p is not None and {n.mac for n in p.nics} == {n.mac for n in cur.nics}
    pr = cur.pressure
    return Row(
        name=cur.name, uuid=cur.uuid, owner=owner, vcpus=cur.vcpus,
        cpu_percent=None if cpu_rate is None or cur.vcpus <= 0
        else cpu_rate / 1e9 / cur.vcpus * 100,
        memory_used_bytes=cur.memory.used_bytes if cur.memory is not None else None,
        memory_alloc_bytes=cur.memory_alloc_bytes,
        disk_read_bytes_per_s=_rate(p_rd, rd, dt_s),
        disk_write_bytes_per_s=_rate(p_wr, wr, dt_s),
        net_in_bytes_per_s=_rate(sum(n.guest_rx_bytes for n in p.nics), net_in, dt_s)
        if p is not None and same_nics else None,
        net_out_bytes_per_s=_rate(sum(n.guest_tx_bytes for n in p.nics), net_out, dt_s)
        if p is not None and same_nics else None,
        gpus=len(cur.gpus),
        pressure_cpu_some_avg10=pr.cpu_some_avg10 if pr else None,
        pressure_memory_some_avg10=pr.memory_some_avg10 if pr else None,
        pressure_io_some_avg10=pr.io_some_avg10 if pr else None,
        cpu_ns=cur.cpu_ns, net_in_bytes=net_in, net_out_bytes=net_out,
        disk_read_bytes=rd, disk_write_bytes=wr, missing=tuple(sorted(cur.missing)),
        missing_why=tuple(sorted(cur.missing.items())))


def rows(prev: Mapping[str, Sample], cur: Sequence[Sample],
         owners: Mapping[str, str]) -> tuple[Row, ...]:
    """Rows of every current sample (`prev` and `owners` keyed by UUID)."""
    return tuple(row(prev.get(s.uuid), s, owners.get(s.uuid, "")) for s in cur)


def totals(rs: Sequence[Row], host_cpus: int) -> Totals:
    """Sums over every row (not only the filtered ones)."""
    cpu = [r.cpu_percent * r.vcpus for r in rs if r.cpu_percent is not None]

    def total(values: Sequence[float | None]) -> float:
        return float(sum(v for v in values if v is not None))

    return Totals(
        domains=len(rs), vcpus=sum(r.vcpus for r in rs),
        memory_alloc_bytes=sum(r.memory_alloc_bytes for r in rs),
        memory_used_bytes=sum(r.memory_used_bytes or 0 for r in rs),
        cpu_percent_of_host=sum(cpu) / host_cpus if cpu and host_cpus > 0 else None,
        disk_read_bytes_per_s=total([r.disk_read_bytes_per_s for r in rs]),
        disk_write_bytes_per_s=total([r.disk_write_bytes_per_s for r in rs]),
        net_in_bytes_per_s=total([r.net_in_bytes_per_s for r in rs]),
        net_out_bytes_per_s=total([r.net_out_bytes_per_s for r in rs]),
        gpus=sum(r.gpus for r in rs))


def _key(r: Row, key: SortKey) -> tuple[float, str]:
    value: float
    if key == "c":
        value = r.cpu_percent if r.cpu_percent is not None else -1.0
    elif key == "m":
        value = float(r.memory_used_bytes if r.memory_used_bytes is not None else -1)
    elif key == "d":
        value = (r.disk_read_bytes_per_s or 0.0) + (r.disk_write_bytes_per_s or 0.0)
    else:
        value = (r.net_in_bytes_per_s or 0.0) + (r.net_out_bytes_per_s or 0.0)
    return (-value, r.name)


def arrange(rs: Sequence[Row], key: SortKey, text: str = "") -> tuple[Row, ...]:
    """Rows whose name or owner contains `text` (any case), biggest `key` first, then by name."""
    needle = text.lower()
    shown = [r for r in rs if needle in r.name.lower() or needle in r.owner.lower()]
    return tuple(sorted(shown, key=lambda r: _key(r, key)))


def as_json(screen: Screen, key: SortKey = "c", text: str = "") -> dict[str, Any]:
    """The `top --json` document (shape documented in the README's `hostagent top` section)."""
    return {
        "time": _iso(screen.t_wall_ns), "interval_s": screen.interval_s,
        "host": {"cpus": screen.host_cpus, **asdict(screen.totals)},
        "daemon": asdict(screen.daemon),
        "sort": SORT_KEYS[key], "filter": text,
        "domains": [asdict(r) | {"missing": list(r.missing), "missing_why": dict(r.missing_why)}
                    for r in arrange(screen.rows, key, text)],
        "errors": list(screen.errors),
    }


# --- rendering ---------------------------------------------------------------------------------


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def human_bytes(n: float | None, per_s: bool = False) -> str:
    """1536 -> '1.5K' (binary units); None -> '-'."""
    if n is None:
        return "-"
    suffix = "/s" if per_s else ""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return (f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}") + suffix
        n /= 1024
    return "-"  # pragma: no cover - the loop always returns


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    s = max(s, 0.0)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def printable(text: str) -> str:
    """`text` with control, format and line/paragraph-separator characters escaped
    (newline -> `\\n`, ESC -> `\\x1b`, U+202E -> `\\u202e`): one line, no terminal codes."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif unicodedata.category(ch) == "Zs":  # other spaces (NBSP...): a plain space
            out.append(" ")
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def header_lines(screen: Screen, key: SortKey, text: str) -> list[str]:
    """The lines above the table: host totals, then the daemon's state (each `printable`)."""
    t, d = screen.totals, screen.daemon
    lines = [
        f"hostagent top  {_iso(screen.t_wall_ns)}  every {screen.interval_s or 0:g}s  "
        f"sort: {SORT_KEYS[key]}  filter: {text or '-'}",
        f"host: {t.domains} domains  {t.vcpus} vCPUs on {screen.host_cpus} CPUs  "
        f"CPU {_pct(t.cpu_percent_of_host)}% of host  "
        f"mem {human_bytes(t.memory_used_bytes)}/{human_bytes(t.memory_alloc_bytes)}  "
        f"disk r {human_bytes(t.disk_read_bytes_per_s, True)} "
        f"w {human_bytes(t.disk_write_bytes_per_s, True)}  "
        f"net in {human_bytes(t.net_in_bytes_per_s, True)} "
        f"out {human_bytes(t.net_out_bytes_per_s, True)}  GPUs {t.gpus}",
    ]
    if not d.available:
        lines.append(f"daemon: unknown ({d.reason})")
    else:
        age = (None if d.last_pass_wall_ns is None
               else (screen.t_wall_ns - d.last_pass_wall_ns) / 1e9)
        parts = [f"daemon: last pass {_age(age)} ago"
                 if age is not None else "daemon: no pass yet"]
        backlog = sum(s.pending for s in d.sinks)
        oldest = max((s.oldest_pending_age_s for s in d.sinks
                      if s.oldest_pending_age_s is not None), default=None)
        parts.append(f"backlog {backlog}" + (f" (oldest {_age(oldest)})" if oldest else ""))
        parts.append("breakers " + (", ".join(f"{s.name}={s.breaker}" for s in d.sinks)
                                    if d.sinks else "-"))
        dead = sum(s.dead_letters for s in d.sinks)
        if dead:
            parts.append(f"dead letters {dead}")
        if d.unattributed_cpu_s is not None:
            parts.append(f"unattributed CPU {d.unattributed_cpu_s:.1f}s")
        lines.append("  ".join(parts))
    lines.extend(f"error: {e}" for e in screen.errors)
    return [printable(line) for line in lines]


COLUMNS = ("NAME", "OWNER", "VCPU", "CPU%", "MEM USED", "MEM ALLOC", "DISK R/s", "DISK W/s",
           "NET IN/s", "NET OUT/s", "GPU", "PSI cpu/mem/io")
# The widest a NAME or OWNER cell gets; longer ones end in "…". Without a cap, one long name
# (libvirt allows thousands of characters) squeezed every other column to "…" on every row.
NAME_MAX_WIDTH = 32
OWNER_MAX_WIDTH = 20


def table(rs: Sequence[Row]) -> Table:
    """The per-domain table (already arranged)."""
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold reverse")
    t.add_column(COLUMNS[0], no_wrap=True, max_width=NAME_MAX_WIDTH, overflow="ellipsis")
    t.add_column(COLUMNS[1], no_wrap=True, max_width=OWNER_MAX_WIDTH, overflow="ellipsis")
    for col in COLUMNS[2:]:  # the figures keep their width: a narrow terminal cuts names first
        t.add_column(col, justify="right", no_wrap=True, min_width=len(col))
    for r in rs:
        psi = "/".join(_pct(x) for x in (r.pressure_cpu_some_avg10,
                                          r.pressure_memory_some_avg10, r.pressure_io_some_avg10))
        # Text, not str: a str cell is parsed as markup ("alice[/]" raised MarkupError).
        t.add_row(Text(printable(r.name)), Text(printable(r.owner) or "-"), str(r.vcpus),
                  _pct(r.cpu_percent),
                  human_bytes(r.memory_used_bytes), human_bytes(r.memory_alloc_bytes),
                  human_bytes(r.disk_read_bytes_per_s, True),
                  human_bytes(r.disk_write_bytes_per_s, True),
                  human_bytes(r.net_in_bytes_per_s, True),
                  human_bytes(r.net_out_bytes_per_s, True), str(r.gpus),
                  psi if r.pressure_cpu_some_avg10 is not None else "-")
    return t


HELP = "keys: c CPU  m memory  d disk  n network  / filter (Enter applies, Esc clears)  q quit"


def render(screen: Screen, key: SortKey, text: str, *, prompt: str | None = None,
           interactive: bool = True) -> RenderableType:
    """The whole screen as one rich renderable."""
    parts: list[RenderableType] = [Text(line) for line in header_lines(screen, key, text)]
    shown = arrange(screen.rows, key, text)
    parts.append(table(shown))
    if not shown:
        parts.append(Text("(no running domain"
                          + (f" matches {printable(repr(text))})" if text else ")")))
    if interactive:
        parts.append(Text(f"filter: {printable(prompt)}_" if prompt is not None else HELP,
                          style="dim"))
    return Group(*parts)
