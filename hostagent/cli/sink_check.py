"""`hostagent sink check NAME`: connect to one configured sink and print what was found.

For a NATS sink: the server it reached, the stream (subjects, storage, replicas, max age,
duplicate window, messages), and for both subjects that the stream owns them and that this
user may publish there (a probe the stream refuses without storing anything). Exit 0 when
everything is usable, 1 with ONE line saying what is wrong otherwise. Sinks without a remote
check (jsonl, formation-queue, webhook) print their settings' summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import trio

from hostagent.cli.terminal import one_line
from hostagent.config.load import Config
from hostagent.config.sinks import NatsSinkConfig

EXIT_FAILED = 1
EXIT_USAGE = 2


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `sink check NAME`."""
    sink = sub.add_parser("sink", parents=parents, help="check a configured sink")
    actions = sink.add_subparsers(dest="sink_command", required=True)
    check = actions.add_parser("check", parents=parents,
                               help="connect and verify the destination, then print it")
    check.add_argument("name", help="the sink's name in the config")


async def check_nats(cfg: NatsSinkConfig, node_id: str) -> list[str]:
    """What a NATS sink finds; SetupError/SinkUnavailable (one line) when it is not usable."""
    from hostagent.delivery.sinks.nats_jetstream import NatsSink

    sink = NatsSink(cfg, node_id=node_id)
    try:
        return await sink.report()
    finally:
        await sink.aclose()


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Run `sink check`; the exit status."""
    from hostagent.delivery.sinks.nats_client import SetupError

    by_name = {s.name: s for s in cfg.sinks}
    sink = by_name.get(args.name)
    if sink is None:
        print(one_line(f"hostagent sink check: no sink named {args.name!r} in {cfg.source} "
                       f"(have: {', '.join(sorted(by_name)) or 'none'})"), file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(sink, NatsSinkConfig):
        print(f"{sink.name} ({sink.type}): no remote check for this sink type; settings OK")
        return 0
    # The client's own warnings (each failed connect attempt) would repeat the one line below.
    logging.getLogger("hostagent.delivery.sinks.nats_jetstream").setLevel(logging.ERROR)
    try:
        lines = trio.run(check_nats, sink, cfg.host.node_id)
    except SetupError as err:
        print(one_line(f"hostagent sink check: {sink.name}: {err}"), file=sys.stderr)
        return EXIT_FAILED
    print(f"{sink.name} (nats): OK")
    for line in lines:
        print(f"  {line}")
    return 0
