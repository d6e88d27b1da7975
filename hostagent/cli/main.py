"""`hostagent`: run | dump | top | check-config | check-rules | outbox | store | sink check
| --version.

Exit status: 0 done; 1 a runtime failure; 2 a usage error, a config error (one line, never a
traceback, whether found by `check-config` or at the start of `run`) or a state store that
start-up refuses (`hostagent store reset` is the way out); 130 interrupted (Ctrl-C); 141
the reader of stdout went away (`| head`: quietly, no traceback). `run`
exits 0 on SIGTERM, also one sent during its start-up (then after start-up, without a pass);
it exits 1 when another daemon holds the state store, and `run --once` / `--passes N` exit 1
when any of their passes did not commit (one line naming why)."""

from __future__ import annotations

import argparse
import functools
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any

import orjson
import trio

from hostagent import __version__, logs
from hostagent.alerts import channels, rules_file
from hostagent.cli.terminal import one_line
from hostagent.config.load import Config, load
from hostagent.delivery.sinks.base import config_routes
from hostagent.errors import ConfigError, DomainNotFound, HostAgentError, StateCorrupt

DEFAULT_CONFIG = "/etc/hostagent/hostagent.toml"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a writer whose reader left
LOG_FORMAT_HELP = ("logs (always on stderr): auto = text on a terminal, json otherwise; "
                   "default: auto (`run`: the config's log.format)")
MAX_INTERVAL_S = 3600.0
# What `run` holds from its first moment until the daemon has closed its store: SIGINT is left
# to Python (Ctrl-C during start-up is KeyboardInterrupt, exit 130).
HELD_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class HeldSignals:
    """`hostagent run`'s signals while its daemon does not listen: recorded, never their
    default action (which ended the process: SIGHUP during start-up killed the daemon, and
    systemd's Restart=on-failure does not restart a death by SIGHUP or SIGTERM; a second
    SIGTERM during shutdown killed it while it closed the store). The daemon's trio receiver
    replaces these handlers while it runs, acts on `take()` first, and gives them back when it
    closes; leaving the block restores the handlers found on entry, unless `keep` (the
    command line's own process, which ends after it): then they are ignored, so a SIGTERM
    while the interpreter exits is not an exit status of -15."""

    def __init__(self, *, keep: bool = False) -> None:
        self.pending: list[int] = []
        self.keep = keep
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> HeldSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers (an embedding caller's)
        for signum in HELD_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._hold)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.keep:  # ignored from here: Python's finalization resets its own handlers
            for signum in self._previous:
                signal.signal(signum, signal.SIG_IGN)
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _hold(self, signum: int, _frame: FrameType | None) -> None:
        self.pending.append(signum)

    def take(self) -> list[int]:
        """The signals held so far (then forgotten)."""
        taken, self.pending = self.pending, []
        return taken


DUMP_HELP = """\
Two samples of each DOMAIN --interval apart: every counter with its source and rate, and the
event the daemon would emit for that interval.

DOMAIN is matched against the running domains by UUID (any case, as virsh), then exact
name, then libvirt id: a domain literally named "34" wins over the domain with id 34. A
name in another case matches only when it is the only such name ("WEB" with both "web" and
"Web" running is a usage error, exit 2, listing them).

--json prints one object when the output is one document (one DOMAIN, or --host alone), else
a list: several DOMAINs or --all ([] when none is running), and with --host the host
document {"host": {...}} last (also after a single DOMAIN). A domain document holds
"domain", "interval_s", "counters", "gpus", "host_gpus", "missing", "event"; the host
document "parent_cgroup", "domains", "interval_s", "parent_cpu_growth_ns",
"domains_cpu_growth_ns", "unattributed_cpu_ns" (docs/cli-json.md)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def interval_arg(text: str) -> float:
    """`dump --interval` and `top --interval`: seconds in (0, 3600]; anything else (nan, inf,
    a negative number) is a usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_INTERVAL_S:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, {MAX_INTERVAL_S:g}] seconds")
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
    from hostagent.cli import sink_check as cli_sink_check
    from hostagent.cli import store as cli_store

    p = argparse.ArgumentParser(prog="hostagent", description=__doc__)
    p.add_argument("--version", action="version", version=f"hostagent {__version__}")
    p.add_argument("--config", "-c", help=f"TOML config (default {DEFAULT_CONFIG} if present)")
    p.add_argument("--log-format", choices=logs.FORMATS, help=LOG_FORMAT_HELP)
    # `--config` and `--log-format` are accepted after the subcommand too.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS,
                        help=f"TOML config (default {DEFAULT_CONFIG} if present)")
    common.add_argument("--log-format", choices=logs.FORMATS, default=argparse.SUPPRESS,
                        help=LOG_FORMAT_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run the collector daemon")
    # Both given, --passes was ignored (one pass ran): a usage error instead.
    how_many = run.add_mutually_exclusive_group()
    how_many.add_argument("--once", action="store_true", help="one pass, deliver, exit")
    how_many.add_argument("--passes", type=_positive_int, help="this many passes, then exit")

    dump = sub.add_parser("dump", parents=[common],
                          help="print one domain's counters, sources, rates and event",
                          description=DUMP_HELP,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    dump.add_argument("domains", nargs="*", metavar="DOMAIN",
                      help="name, UUID or libvirt id (a domain named like an id wins)")
    dump.add_argument("--all", action="store_true",
                      help="every running domain (none running: a note on stderr, exit 0); "
                           "not with DOMAINs")
    dump.add_argument("--interval", type=interval_arg, default=1.0,
                      help=f"seconds between samples, in (0, {MAX_INTERVAL_S:g}]")
    dump.add_argument("--json", action="store_true", help="machine-readable output")
    dump.add_argument("--host", action="store_true",
                      help="also the host's unattributed CPU (VM parent cgroup vs domains)")

    top = sub.add_parser("top", parents=[common],
                         help="live per-domain view of this host (q quits; c m d n sort; / filter)")
    top.add_argument("--interval", type=interval_arg, default=2.0,
                     help=f"seconds between refreshes, in (0, {MAX_INTERVAL_S:g}]")
    top.add_argument("--filter", default="", help="only domains whose name or owner contains this")
    top.add_argument("--sort", choices=("c", "m", "d", "n"), default="c",
                     help="c: CPU, m: memory, d: disk, n: network (default c)")
    top.add_argument("--once", action="store_true", help="print one refresh and exit")
    top.add_argument("--json", action="store_true", help="one refresh as JSON (implies --once)")

    check = sub.add_parser("check-config", parents=[common],
                           help="validate a config file (and the rules file it names) and exit; "
                                "FILE is the config checked (--config only as the same file)")
    check.add_argument("file")
    check.add_argument("--quiet", "-q", action="store_true")
    check.add_argument("--json", action="store_true", help="machine-readable output")

    rules = sub.add_parser("check-rules", parents=[common],
                           help="validate a threshold rules file against the configured sinks' "
                                "channels, list those channels, and exit")
    rules.add_argument("file")
    rules.add_argument("--quiet", "-q", action="store_true")
    rules.add_argument("--json", action="store_true", help="machine-readable output")

    cli_outbox.add_parser(sub, parents=[common])
    cli_sink_check.add_parser(sub, parents=[common])
    cli_store.add_parser(sub, parents=[common])
    return p


def _print_json(doc: object) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _check_config(args: argparse.Namespace) -> int:
    from hostagent.cli.store import check_store
    from hostagent.config import preflight

    config = getattr(args, "config", None)
    if config is not None and os.path.abspath(config) != os.path.abspath(args.file):
        # It was ignored, and a config other than the one meant was checked (exit 0).
        print(f"hostagent check-config: checks FILE ({one_line(args.file)}), not --config "
              f"({one_line(config)}): name the config to check once, as FILE", file=sys.stderr)
        return EXIT_USAGE
    cfg = load(args.file)
    flag = getattr(args, "log_format", None)  # as the other commands: `run` alone reads log.format
    logs.setup(cfg.log.level, flag or "auto", pin=bool(flag))  # stderr
    preflight.check(cfg)
    store_note = check_store(cfg)
    n_rules = None
    if cfg.thresholds.rules_path:
        found = rules_file.load_rules(cfg.thresholds.rules_path,
                                      key="thresholds.rules_path")
        channels.check(found, config_routes(cfg.sinks),
                       source=cfg.thresholds.rules_path)
        n_rules = len(found)
    if args.json:
        _print_json({"file": args.file, "ok": True,
                     "sinks": [{"name": s.name, "type": s.type} for s in cfg.sinks],
                     "rules_path": cfg.thresholds.rules_path or None, "rules": n_rules,
                     "store": store_note})
    elif not args.quiet:
        print(f"{args.file}: OK ({len(cfg.sinks)} sink(s): "
              + ", ".join(f"{s.name} ({s.type})" for s in cfg.sinks) + ")"
              + ("" if n_rules is None
                 else f"; {cfg.thresholds.rules_path}: {n_rules} rule(s)")
              + f"; {store_note}")
    return 0


def _check_rules(args: argparse.Namespace) -> int:
    # Channels are checked against the sinks of an explicit --config (check-config always
    # checks them): ansible validates the rules before it writes the config naming them.
    config = getattr(args, "config", None)
    routes = config_routes(load(config).sinks) if config else None
    found = rules_file.load_rules(args.file)
    channels.check(found, routes, source=args.file)
    n = len(found)
    served = channels.served(routes) if routes is not None else None
    if args.json:
        _print_json({"file": args.file, "ok": True, "rules": n,
                     "channels": ({ch: list(names) for ch, names in served.items()}
                                  if served is not None else None)})
    elif not args.quiet:
        print(f"{args.file}: OK ({n} rule(s))")
        if served is None:
            print("channels not checked: pass --config to check them against its sinks")
        else:
            print("channels served by the configured sinks:")
            for ch, names in served.items():
                print(f"  {ch:<24} {', '.join(names)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: 0 done, 1 a runtime failure, 2 a usage, config or store error,
    130 interrupted (Ctrl-C: no traceback; the terminal is restored on the way out), 141 the
    reader of stdout went away (`hostagent dump --all | head -1`: quietly, as a command killed
    by SIGPIPE, which Python ignores and turns into BrokenPipeError)."""
    args = _parser().parse_args(argv)
    try:
        status = _main(args, entry=argv is None)
        sys.stdout.flush()  # here, not at the interpreter's exit, where it cannot be caught
        return status
    except BrokenPipeError:
        if argv is None:
            # What is left in stdout's buffer would be flushed again at exit, and fail again
            # ("Exception ignored ... BrokenPipeError", exit 120): stdout becomes /dev/null,
            # as Python's documentation advises (signal module, "Note on SIGPIPE").
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(args: argparse.Namespace, *, entry: bool) -> int:
    """The command, with every error it may end in reported as one line on stderr."""
    try:
        try:
            return _command(args, entry=entry)
        except BaseExceptionGroup as group:  # from a nursery: report the cause, not the tree
            raise _cause(group) from group
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ConfigError as err:
        _json_failure(args, err)
        print(f"hostagent: config error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except (DomainNotFound, StateCorrupt) as err:
        _json_failure(args, err)
        print(f"hostagent: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except HostAgentError as err:
        _json_failure(args, err)
        print(f"hostagent: {one_line(err)}", file=sys.stderr)
        return 1


def _cause(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to report for a group: KeyboardInterrupt when it holds one (Ctrl-C in a
    nursery), else its first hostagent error (a ConfigError first), or the group itself when
    it holds anything else (a bug: the traceback is wanted)."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    interrupt = next((e for e in leaves if isinstance(e, KeyboardInterrupt)), None)
    if interrupt is not None:
        return interrupt
    ours = [e for e in leaves if isinstance(e, HostAgentError)]
    if not ours or len(ours) != len(leaves):
        return group
    return next((e for e in ours if isinstance(e, ConfigError)), ours[0])


def _command(args: argparse.Namespace, *, entry: bool = False) -> int:
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "check-rules":
        return _check_rules(args)
    if args.command == "run":
        # before the config is read: start-up takes seconds (store checks, libvirt)
        with HeldSignals(keep=entry) as held:
            return _run(args, held)
    cfg = _load(args.config)
    # These commands log for the person running them (text on a terminal) unless
    # --log-format says otherwise; `run` logs in the config's log.format (`_run`).
    flag = getattr(args, "log_format", None)
    logs.setup(cfg.log.level, flag or "auto", pin=bool(flag))  # stderr
    if args.command == "dump":
        return _dump(cfg, args)
    if args.command == "top":
        from hostagent.cli import top

        return top.run(cfg, args)
    if args.command == "outbox":
        from hostagent.cli import outbox as cli_outbox

        return cli_outbox.run(args, cfg)
    if args.command == "store":
        from hostagent.cli import store as cli_store

        return cli_store.run(args, cfg)
    if args.command == "sink":
        from hostagent.cli import sink_check as cli_sink_check

        return cli_sink_check.run(args, cfg)
    return EXIT_USAGE  # pragma: no cover - argparse enforces a command


def _run(args: argparse.Namespace, held: HeldSignals) -> int:
    cfg = _load(args.config)
    flag = getattr(args, "log_format", None)
    logs.setup(cfg.log.level, flag or cfg.log.format, pin=bool(flag))  # stderr
    from hostagent import daemon

    passes = 1 if args.once else args.passes
    return daemon.run(cfg, config_path=args.config, passes=passes, held_signals=held.take)


def _json_failure(args: argparse.Namespace, err: HostAgentError) -> None:
    """`check-* --json` also answers on stdout when the file is bad: `{"ok": false, ...}`."""
    if args.command in ("check-config", "check-rules") and args.json:
        _print_json({"file": args.file, "ok": False, "error": str(err)})


def _dump(cfg: Config, args: argparse.Namespace) -> int:
    from hostagent.cli.dump import collect_dump, render_text

    if not args.domains and not args.all and not args.host:
        print("hostagent dump: name a DOMAIN (name or UUID) or pass --all or --host",
              file=sys.stderr)
        return EXIT_USAGE
    if args.all and args.domains:  # the DOMAINs were ignored, a misspelt one too (exit 0)
        print("hostagent dump: --all dumps every running domain: name DOMAINs or pass --all, "
              "not both", file=sys.stderr)
        return EXIT_USAGE
    docs = trio.run(functools.partial(collect_dump, host=args.host), cfg,
                    [] if args.all else args.domains, args.interval)
    host_only = args.host and not args.domains and not args.all
    if host_only:
        docs = docs[-1:]  # only the host document
    domain_docs = [d for d in docs if "host" not in d]
    if args.all and not domain_docs:
        print("hostagent dump: no running domains", file=sys.stderr)
    elif args.domains and not args.all and not domain_docs:
        # listed a moment before, gone by the first sample: nothing to show
        names = ", ".join(one_line(d if len(d) <= 80 else d[:77] + "...")
                          for d in args.domains)  # escaped: a name cannot drive the terminal
        print(f"hostagent dump: {names}: stopped during the dump", file=sys.stderr)
        return 1
    if args.json:
        one = host_only or (len(args.domains) == 1 and not args.all and not args.host)
        sys.stdout.write(orjson.dumps(docs[0] if one else docs,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(docs))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
