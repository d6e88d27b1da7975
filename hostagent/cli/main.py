"""`hostagent`: run | dump | check-config | outbox | sink check | --version."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import orjson
import trio

from hostagent import __version__, logs
from hostagent.alerts import rules_source
from hostagent.config.load import Config, load
from hostagent.errors import ConfigError, DomainNotFound, HostAgentError

DEFAULT_CONFIG = "/etc/hostagent/hostagent.toml"
EXIT_USAGE = 2


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
    from hostagent.cli import sink_check as cli_sink_check

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
    run.add_argument("--passes", type=int, help="this many passes, then exit")

    dump = sub.add_parser("dump", parents=[common],
                          help="print one domain's counters, sources, rates and event")
    dump.add_argument("domains", nargs="*", metavar="DOMAIN", help="name or UUID")
    dump.add_argument("--all", action="store_true", help="every running domain")
    dump.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    dump.add_argument("--json", action="store_true", help="machine-readable output")

    check = sub.add_parser("check-config",
                           help="validate a config file (and the rules file it names) and exit")
    check.add_argument("file")
    check.add_argument("--quiet", "-q", action="store_true")

    rules = sub.add_parser("check-rules", help="validate a threshold rules file and exit")
    rules.add_argument("file")
    rules.add_argument("--quiet", "-q", action="store_true")

    cli_outbox.add_parser(sub, parents=[common])
    cli_sink_check.add_parser(sub, parents=[common])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = load(args.file)
            n_rules = (len(rules_source.load_rules(cfg.thresholds.rules_path))
                       if cfg.thresholds.rules_path else None)
            if not args.quiet:
                print(f"{args.file}: OK ({len(cfg.sinks)} sink(s): "
                      + ", ".join(f"{s.name} ({s.type})" for s in cfg.sinks) + ")"
                      + ("" if n_rules is None
                         else f"; {cfg.thresholds.rules_path}: {n_rules} rule(s)"))
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
        if args.command == "sink":
            from hostagent.cli import sink_check as cli_sink_check

            return cli_sink_check.run(args, cfg)
    except ConfigError as err:
        print(f"hostagent: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DomainNotFound as err:
        print(f"hostagent: {err}", file=sys.stderr)
        return EXIT_USAGE
    except HostAgentError as err:
        print(f"hostagent: {err}", file=sys.stderr)
        return 1
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
