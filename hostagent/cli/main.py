"""`hostagent`: run | dump | check-config | check-rules | outbox | store | --version.

Exit status: 0 done; 1 a runtime failure; 2 a usage error, a config error (one line, never a
traceback, whether found by `check-config` or at the start of `run`) or a state store that
start-up refuses (`hostagent store reset` is the way out)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import orjson
import trio

from hostagent import __version__, logs
from hostagent.alerts import rules_source
from hostagent.config.load import Config, load
from hostagent.errors import ConfigError, DomainNotFound, HostAgentError, StateCorrupt

DEFAULT_CONFIG = "/etc/hostagent/hostagent.toml"
EXIT_USAGE = 2
MAX_DUMP_INTERVAL_S = 3600.0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def dump_interval_s(text: str) -> float:
    """`dump --interval`: seconds in (0, 3600]; anything else is a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_DUMP_INTERVAL_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not in (0, {MAX_DUMP_INTERVAL_S:g}] seconds")
    return value


def _load(path: str | None) -> Config:
    if path is None:
        try:
            return load(DEFAULT_CONFIG)
        except ConfigError as err:
            if err.found == "no such file":
                return Config()
            raise
    return load(path)


def _parser() -> argparse.ArgumentParser:
    from hostagent.cli import outbox as cli_outbox
    from hostagent.cli import store as cli_store

    p = argparse.ArgumentParser(prog="hostagent", description=__doc__)
    p.add_argument("--version", action="version", version=f"hostagent {__version__}")
    p.add_argument("--config", "-c", help=f"TOML config (default {DEFAULT_CONFIG} if present)")
    # `--config` is accepted after the subcommand too (`hostagent run --config F`).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help=f"TOML config (default {DEFAULT_CONFIG} if present)")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run the collector daemon")
    run.add_argument("--once", action="store_true", help="one pass, deliver, exit")
    run.add_argument("--passes", type=_positive_int, help="this many passes, then exit")

    dump = sub.add_parser("dump", parents=[common],
                          help="print one domain's counters, sources, rates and event")
    dump.add_argument("domains", nargs="*", metavar="DOMAIN", help="name or UUID")
    dump.add_argument("--all", action="store_true", help="every running domain")
    dump.add_argument("--interval", type=dump_interval_s, default=1.0,
                      help=f"seconds between samples, in (0, {MAX_DUMP_INTERVAL_S:g}]")
    dump.add_argument("--json", action="store_true", help="machine-readable output")

    check = sub.add_parser("check-config",
                           help="validate a config file (and the rules file it names) and exit")
    check.add_argument("file")
    check.add_argument("--quiet", "-q", action="store_true")

    rules = sub.add_parser("check-rules", help="validate a threshold rules file and exit")
    rules.add_argument("file")
    rules.add_argument("--quiet", "-q", action="store_true")

    cli_outbox.add_parser(sub, parents=[common])
    cli_store.add_parser(sub, parents=[common])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 done, 1 a runtime failure, 2 a usage, config or store error."""
    args = _parser().parse_args(argv)
    try:
        try:
            return _command(args)
        except BaseExceptionGroup as group:  # from a nursery: report the cause, not the tree
            raise _cause(group) from group
    except ConfigError as err:
        print(f"hostagent: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (DomainNotFound, StateCorrupt) as err:
        print(f"hostagent: {err}", file=sys.stderr)
        return EXIT_USAGE
    except HostAgentError as err:
        print(f"hostagent: {err}", file=sys.stderr)
        return 1


def _cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to report for a group: its first hostagent error (a ConfigError first),
    or the group itself when it holds anything else (a bug: the traceback is wanted)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    ours = [e for e in leaves if isinstance(e, HostAgentError)]
    if not ours or len(ours) != len(leaves):
        return group
    return next((e for e in ours if isinstance(e, ConfigError)), ours[0])


def _command(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        from hostagent.cli.store import check_store
        from hostagent.config import preflight

        cfg = load(args.file)
        preflight.check(cfg)
        store_note = check_store(cfg)
        n_rules = (len(rules_source.load_rules(cfg.thresholds.rules_path))
                   if cfg.thresholds.rules_path else None)
        if not args.quiet:
            print(f"{args.file}: OK ({len(cfg.sinks)} sink(s): "
                  + ", ".join(f"{s.name} ({s.type})" for s in cfg.sinks) + ")"
                  + ("" if n_rules is None
                     else f"; {cfg.thresholds.rules_path}: {n_rules} rule(s)")
                  + f"; {store_note}")
        return 0
    if args.command == "check-rules":
        n = len(rules_source.load_rules(args.file))
        if not args.quiet:
            print(f"{args.file}: OK ({n} rule(s))")
        return 0
    cfg = _load(args.config)
    logs.setup(cfg.log.level, cfg.log.format, stream=sys.stderr
               if args.command != "run" else sys.stdout)
    if args.command == "run":
        from hostagent import daemon

        passes = 1 if args.once else args.passes
        return daemon.run(cfg, config_path=args.config, passes=passes)
    if args.command == "dump":
        return _dump(cfg, args)
    if args.command == "outbox":
        from hostagent.cli import outbox as cli_outbox

        return cli_outbox.run(args, cfg)
    if args.command == "store":
        from hostagent.cli import store as cli_store

        return cli_store.run(args, cfg)
    return EXIT_USAGE  # pragma: no cover - argparse enforces a command


def _dump(cfg: Config, args: argparse.Namespace) -> int:
    from hostagent.cli.dump import collect_dump, render_text

    if not args.domains and not args.all:
        print("hostagent dump: name a DOMAIN (name or UUID) or pass --all", file=sys.stderr)
        return EXIT_USAGE
    docs = trio.run(collect_dump, cfg, [] if args.all else args.domains, args.interval)
    if args.json:
        sys.stdout.write(orjson.dumps(docs if args.all or len(args.domains) > 1 else docs[0]
                                      if docs else None, option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    else:
        sys.stdout.write(render_text(docs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
