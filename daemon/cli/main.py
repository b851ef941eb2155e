"""Parse the command line and run one command. `--config` and `--log-level` are accepted before
or after any subcommand (`medbatch audit verify --config X`), as the README, the Makefile and
the systemd unit write them."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from daemon import __version__
from daemon.cli.exits import EX_BROKEN_PIPE, EX_SOFTWARE, exit_status

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _common() -> argparse.ArgumentParser:
    # SUPPRESS: a subcommand that is not given the option must not reset what came before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="config file (default: $MEDBATCH_CONFIG, else ./config/medbatch.toml if it "
        "exists, else /etc/medbatch/medbatch.toml)",
    )
    common.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=argparse.SUPPRESS,
        help="default: $MEDBATCH_LOG_LEVEL, else INFO",
    )
    return common


def parser() -> argparse.ArgumentParser:
    common = _common()
    top = argparse.ArgumentParser(prog="medbatch", parents=[common])
    top.add_argument("--version", action="version", version=f"medbatch {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str,
        help_text: str,
        into: argparse._SubParsersAction[argparse.ArgumentParser] = commands,
    ) -> argparse.ArgumentParser:
        return into.add_parser(name, help=help_text, description=help_text, parents=[common])

    run = add("run", "run the service in the foreground")
    run.add_argument(
        "--once", action="store_true", help="take what is in the inboxes, publish it all, exit"
    )
    check = add("check-config", "validate a config and the folders it names, print the settings")
    check.add_argument("path", nargs="?", help="the config to check (default: as --config)")
    status = add("status", "per pipeline: waiting, in flight, published, quarantined")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    audit = add("audit", "audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    add("verify", "check the audit log's hash chain end to end", audit_commands)
    trace = add("trace", "the lineage of one input")
    trace.add_argument("key", metavar="FILE-OR-SHA256")
    prune = add("prune", "apply retention now (the running service prunes by itself)")
    prune.add_argument(
        "--dry-run", action="store_true", help="list what would go (counts and bytes, no names)"
    )
    requeue = add("requeue", "put a quarantined input back through its pipeline")
    requeue.add_argument("key", metavar="FILE-OR-SHA256", nargs="?")
    requeue.add_argument("--all", action="store_true", help="every quarantined input (--reason)")
    requeue.add_argument("--reason", help="only inputs quarantined for this reason")
    requeue.add_argument(
        "--force", action="store_true", help="even when the reason would recur unchanged"
    )
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "run":
        # Held until the service has its handlers: a SIGTERM during start-up then drains
        # instead of killing the process by the default action.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return _dispatch(args)
    except BrokenPipeError:
        # The reader went away (`medbatch status | head`): nothing to say, and no one to say it to.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except Exception as exc:
        code = exit_status(exc)
        if code is not None:
            print(f"medbatch: {exc}", file=sys.stderr)
            return code
        _log_crash(exc)
        return EX_SOFTWARE
    finally:
        if args.command == "run":
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _dispatch(args: argparse.Namespace) -> int:
    from daemon.config import config_path_from, load_settings
    from daemon.logs import configure_logging

    configure_logging(getattr(args, "log_level", None) or _env_level())
    config = getattr(args, "config", None)
    if args.command == "check-config":
        from daemon.cli.check_config import check_config

        return check_config(Path(args.path) if args.path else config_path_from(config))
    settings = load_settings(config_path_from(config))
    if args.command == "run":
        from daemon.cli.run import run

        return run(settings, once=args.once)
    if args.command == "status":
        from daemon.cli.status import status

        return status(settings, as_json=args.json)
    if args.command == "audit":
        from daemon.cli.audit_verify import audit_verify

        return audit_verify(settings)
    if args.command == "prune":
        from daemon.cli.prune import prune

        return prune(settings, dry_run=args.dry_run)
    if args.command == "requeue":
        from daemon.cli.requeue import requeue

        return requeue(settings, args.key, every=args.all, reason=args.reason, force=args.force)
    from daemon.cli.trace import trace

    return trace(settings, args.key)


def _env_level() -> str:
    return os.environ.get("MEDBATCH_LOG_LEVEL", "INFO")


def _log_crash(exc: BaseException) -> None:
    # A bug or an I/O failure: no message text (it can quote a path or a value), only the type
    # and where; systemd restarts the service and recovery picks up from the journal.
    import structlog

    frames = [
        f"{Path(f.filename).name}:{f.lineno}:{f.name}"
        for f in traceback.extract_tb(exc.__traceback__)
    ]
    structlog.get_logger().critical("daemon.crashed", error=type(exc).__name__, frames=frames[-8:])
