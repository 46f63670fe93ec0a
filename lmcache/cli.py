"""The ``lmcache`` command line: ``bench``, ``fsck``, ``ls``, ``server``, ``server-ctl``, ``stats``, ``version``.

Each top-level subcommand is one ``_register_<name>(subparsers)`` function that adds its parser
and sets ``func`` to a ``_cmd_<name>(args) -> int`` handler; :data:`COMMANDS` lists the
registration functions in help order. To add a subcommand (``server``…), write the pair and
append the registration function. ``bench`` workloads are not listed here: they come from
:data:`lmcache.bench.WORKLOADS` (see :mod:`lmcache.bench`).

Errors: any :class:`~lmcache.errors.LMCacheError` (bad URL, unknown scheme, missing SDK, a
backend failure) and any bad option are printed as one line on stderr, ``lmcache: error: …``,
with exit status 2 and no traceback. Anything else is a bug and keeps its traceback.

``ls`` and ``stats`` only look: a backend with a ``read_only`` option (``file://``) is opened
with it, so they never remove or write anything, and the damaged files its scan found are
reported (``fsck`` checks fully and repairs). Logging goes to stderr through handlers that
scrub credentials (:mod:`lmcache.logfilter`), so ``-vv`` never prints an S3 session token.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from lmcache.errors import LMCacheError, MissingDependencyError
from lmcache.logfilter import install_redaction

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.backends.file import DamagedFile

__all__ = ["COMMANDS", "build_parser", "main"]

PROG = "lmcache"
EXIT_USAGE = 2


class _OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------
# Subcommands


def _register_version(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the lmcache version")
    p.set_defaults(func=_cmd_version)


def _cmd_version(args: argparse.Namespace) -> int:
    import platform

    from lmcache import __version__

    print(f"lmcache {__version__} (Python {platform.python_version()}, {platform.platform()})")
    return 0


def _register_ls(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ls",
        help="list the keys a backend holds",
        description="List the keys a backend holds, one per line (key, then size in bytes where known).",
    )
    p.add_argument("url", help="backend URL, e.g. file:///var/lib/lmcache")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N keys")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of text")
    p.set_defaults(func=_cmd_ls)


def _cmd_ls(args: argparse.Namespace) -> int:
    return asyncio.run(_ls(args.url, args.limit, args.json))


def _read_only_url(url: str) -> str:
    """``url`` with ``read_only=true`` where its backend has that option.

    ``tiered://`` passes it to each of its tiers, a codec layer to the backend it wraps.
    """
    from urllib.parse import parse_qsl, urlencode

    from lmcache.backends.registry import open_backend
    from lmcache.tiered import TieredBackend

    backend = open_backend(url)
    base, _, query = url.partition("?")  # not urlunsplit: it drops the // of "tiered://?…"
    pairs = parse_qsl(query, keep_blank_values=True)
    if isinstance(backend, TieredBackend):
        pairs = [(k, _read_only_url(v) if k == "tier" else v) for k, v in pairs]
    else:
        inner = getattr(backend, "inner", backend)  # a codec layer: the option is its backend's
        settings = getattr(inner, "settings", None)
        fields = dataclasses.fields(settings) if dataclasses.is_dataclass(settings) else ()
        if not any(f.name == "read_only" for f in fields):
            return url
        pairs = [(k, v) for k, v in pairs if k != "read_only"] + [("read_only", "true")]
    return f"{base}?{urlencode(pairs)}"


def _open_read_only(url: str) -> StorageBackend:
    """The backend for ``url``, opened read-only where it or its tiers have that option (no I/O)."""
    from lmcache.backends.registry import open_backend

    return open_backend(_read_only_url(url))


def _damaged_files(backend: StorageBackend) -> list[DamagedFile]:
    """What the backend's open-time scan found damaged (file:// and its subclasses)."""
    from lmcache.backends.file import FileBackend
    from lmcache.tiered import TieredBackend

    if isinstance(backend, TieredBackend):
        return [d for tier in backend.tiers for d in _damaged_files(tier)]
    backend = getattr(backend, "inner", backend)
    return backend.damaged_files() if isinstance(backend, FileBackend) else []


def _report_damage(url: str, damaged: list[DamagedFile]) -> None:
    from lmcache.backends.base import redact_url

    if not damaged:
        return
    print(
        f"{PROG}: {len(damaged)} damaged file(s) found and left in place "
        f"(`{PROG} fsck {redact_url(url)}` checks fully, `--repair` removes them):",
        file=sys.stderr,
    )
    for d in damaged:
        print(f"  {d.reason}\t{d.path}\t{d.detail}", file=sys.stderr)


async def _ls(url: str, limit: int | None, as_json: bool) -> int:
    backend = _open_read_only(url)
    shown = 0
    async with backend:
        async for key, size in backend.list_entries():
            if limit is not None and shown >= limit:
                break
            if as_json:
                print(json.dumps({"key": key.to_string(), "size": size}))
            else:
                print(f"{key.to_string()}\t{'-' if size is None else size}")
            shown += 1
        damaged = _damaged_files(backend)
    print(f"{shown} key(s)" + (f" (limit {limit})" if limit is not None and shown >= limit else ""), file=sys.stderr)
    _report_damage(url, damaged)
    return 0


def _register_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="print a backend's stats as JSON",
        description="Open a backend, check it answers, and print its capabilities and stats as JSON.",
    )
    p.add_argument("url", help="backend URL")
    p.set_defaults(func=_cmd_stats)


def _cmd_stats(args: argparse.Namespace) -> int:
    return asyncio.run(_stats(args.url))


async def _stats(url: str) -> int:
    from lmcache.backends.base import redact_url

    backend = _open_read_only(url)
    async with backend:
        await backend.ping()
        out = {
            "url": redact_url(backend.url, backend.secret_options),
            "backend": f"{type(backend).__module__}.{type(backend).__qualname__}",
            "capabilities": dataclasses.asdict(backend.capabilities),
            "stats": backend.stats(),
        }
        damaged = _damaged_files(backend)
        if damaged:
            out["damaged_files"] = [dataclasses.asdict(d) for d in damaged]
    print(json.dumps(out, indent=2, default=str))
    _report_damage(url, damaged)
    return 0


#: ``lmcache fsck`` exit statuses (as e2fsck's): clean, damage found and all of it removed,
#: damage left in place.
FSCK_CLEAN, FSCK_REPAIRED, FSCK_DAMAGED = 0, 1, 4


def _register_fsck(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fsck",
        help="check a file:// cache directory for damaged files (--repair removes them)",
        description=(
            "Read every value in a file:// (or gds://) cache directory and check its header, length, key and "
            "checksum; also find stale temp files and directories, FIFOs or symlinks at value names. Prints one "
            "line per damaged file (reason, path, detail). Without --repair nothing is changed. Safe to run "
            "while other processes use the cache."
        ),
        epilog=(
            f"exit status: {FSCK_CLEAN} clean; {FSCK_REPAIRED} damage found and all of it removed (--repair); "
            f"{FSCK_DAMAGED} damage left in place; {EXIT_USAGE} bad URL or unreadable directory."
        ),
    )
    p.add_argument("url", help="cache URL, e.g. file:///var/lib/lmcache")
    p.add_argument("--repair", action="store_true", help="remove the damaged files found")
    p.add_argument("--json", action="store_true", help="print one JSON object (counts and every damaged file)")
    p.set_defaults(func=_cmd_fsck)


def _cmd_fsck(args: argparse.Namespace) -> int:
    from lmcache.backends.file import FileBackend
    from lmcache.backends.file.fsck import check_directory
    from lmcache.backends.registry import open_backend
    from lmcache.errors import ConfigError

    backend = open_backend(args.url)  # parses the URL only: no I/O
    if not isinstance(backend, FileBackend):
        raise ConfigError(f"fsck checks file:// cache directories; {type(backend).__name__} is not one")
    report = check_directory(backend.settings.path, repair=args.repair, workers=backend.settings.workers)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        for d in report.damaged:
            print(f"{d.reason}\t{d.path}\t{d.detail}" + ("\tremoved" if d.removed else ""))
        removed = len(report.damaged) - len(report.remaining)
        print(
            f"{report.root}: {report.values} good value(s), {report.bytes} bytes; "
            f"{len(report.damaged)} damaged" + (f", {removed} removed" if args.repair else ""),
            file=sys.stderr,
        )
    if report.remaining:
        return FSCK_DAMAGED
    return FSCK_REPAIRED if report.damaged else FSCK_CLEAN


def _register_bench(sub: argparse._SubParsersAction) -> None:
    from lmcache.bench import WORKLOADS, checked_json_output

    p = sub.add_parser(
        "bench",
        help="run a benchmark workload (prints a table, writes JSON)",
        description="Benchmarks. Goals are ratios against a baseline measured in the same run.",
    )
    workloads = p.add_subparsers(dest="workload", metavar="WORKLOAD", parser_class=_OneLineErrorParser)
    workloads.required = True
    for name, module_name in WORKLOADS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            # One broken or under-installed workload must not take the whole CLI down.
            _register_unavailable(workloads, name, module_name, exc)
            continue
        wp = module.add_parser(workloads)
        wp.set_defaults(func=checked_json_output(module.run_cli))  # --json checked before the run


def _register_unavailable(sub: argparse._SubParsersAction, name: str, module_name: str, exc: ImportError) -> None:
    reason = f"{module_name} cannot be imported: {exc}"
    p = sub.add_parser(name, help=f"(unavailable: {reason})")

    def fail(args: argparse.Namespace) -> int:
        raise MissingDependencyError(exc.name or module_name, None, f"lmcache bench {name}") from exc

    p.set_defaults(func=fail)


def _register_server(sub: argparse._SubParsersAction) -> None:
    # One registration for the daemon and its control client: both live in lmcache.server.
    from lmcache.server.ctl import add_ctl_arguments
    from lmcache.server.daemon import add_server_arguments

    p = sub.add_parser(
        "server",
        help="run the standalone cache server (lm:// clients, HTTP control API, /metrics)",
        description="Serve a tiered cache to lm:// and lm+unix:// clients; see docs/server.md.",
    )
    add_server_arguments(p)
    p.set_defaults(func=_cmd_server)
    c = sub.add_parser(
        "server-ctl",
        help="talk to a running server's HTTP control API",
        description="health, stats, metrics, lookup, pin, unpin, clear and move on a running lmcache server.",
    )
    add_ctl_arguments(c)
    c.set_defaults(func=_cmd_server_ctl)


def _cmd_server(args: argparse.Namespace) -> int:
    from lmcache.server.daemon import run_server_cli

    return run_server_cli(args)


def _cmd_server_ctl(args: argparse.Namespace) -> int:
    from lmcache.server.ctl import run_ctl_cli

    return run_ctl_cli(args)


#: Registration functions of the top-level subcommands, in help order.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _register_bench,
    _register_fsck,
    _register_ls,
    _register_server,
    _register_stats,
    _register_version,
]


# ---------------------------------------------------------------------------------------------
# Entry point


def build_parser() -> argparse.ArgumentParser:
    """The full ``lmcache`` argument parser."""
    parser = _OneLineErrorParser(prog=PROG, description="lmcache: a KV-cache layer for LLM inference.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrorParser)
    sub.required = True
    for register in COMMANDS:
        register(sub)
    return parser


def _warn_url_secrets(args: argparse.Namespace) -> None:
    """Warn about each URL argument that holds a secret (any local user reads argv in ps)."""
    from urllib.parse import parse_qsl

    from lmcache.backends.registry import warn_command_line_secrets

    for name, value in vars(args).items():
        if args.command == "server" and name == "tier":
            continue  # the server warns about its own --tier while it builds the stack
        values = value if isinstance(value, list | tuple) else [value]
        flag = "url" if name == "url" and args.command in ("ls", "stats", "fsck") else f"--{name.replace('_', '-')}"
        urls = [v for v in values if isinstance(v, str) and "://" in v]
        while urls:
            url = urls.pop()
            if url.startswith("tiered:"):  # its tiers' URLs are encoded in its query
                urls += [v for k, v in parse_qsl(url.partition("?")[2]) if k == "tier"]
            else:
                warn_command_line_secrets(url, flag)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lmcache`` command; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    install_redaction()  # SDK debug logs (botocore at -vv) print credentials otherwise
    _warn_url_secrets(args)
    try:
        return int(args.func(args) or 0)
    except LMCacheError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
