"""Text for a terminal line: what the commands print on stderr (errors) and in tables.

A path, URI, domain name or sink error may hold a newline or an ESC (a name chosen by a tenant,
a hostile sink's reply): printed raw, it would forge a second line or redraw the terminal.
`one_line` shows every character that is not printable escaped (`\\n`, `\\x1b`, `\\u202e`);
`--json` output keeps strings as they are. `hostagent top` has its own (`top_view.printable`:
it also turns other spaces into plain ones, for its columns)."""

from __future__ import annotations


def one_line(text: object) -> str:
    """`str(text)` on one line, control and format characters escaped."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                   for ch in s)
