"""The ``lmcache`` command line: ``bench``, ``ls``, ``server``, ``server-ctl``, ``stats``, ``version``.

Each top-level subcommand is one ``_register_<name>(subparsers)`` function that adds its parser
and sets ``func`` to a ``_cmd_<name>(args) -> int`` handler; :data:`COMMANDS` lists the
registration functions in help order. To add a subcommand (``server``…), write the pair and
append the registration function. ``bench`` workloads are not listed here: they come from
:data:`lmcache.bench.WORKLOADS` (see :mod:`lmcache.bench`).

Errors: any :class:`~lmcache.errors.LMCacheError` (bad URL, unknown scheme, missing SDK, a
backend failure) and any bad option are printed as one line on stderr, ``lmcache: error: …``,
with exit status 2 and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lmcache.errors import LMCacheError, MissingDependencyError

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


async def _ls(url: str, limit: int | None, as_json: bool) -> int:
    from lmcache.backends.registry import open_backend

    backend = open_backend(url)
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
    print(f"{shown} key(s)" + (f" (limit {limit})" if limit is not None and shown >= limit else ""), file=sys.stderr)
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
    import dataclasses

    from lmcache.backends.base import redact_url
    from lmcache.backends.registry import open_backend

    backend = open_backend(url)
    async with backend:
        await backend.ping()
        out = {
            "url": redact_url(backend.url, backend.secret_options),
            "backend": f"{type(backend).__module__}.{type(backend).__qualname__}",
            "capabilities": dataclasses.asdict(backend.capabilities),
            "stats": backend.stats(),
        }
    print(json.dumps(out, indent=2, default=str))
    return 0


def _register_bench(sub: argparse._SubParsersAction) -> None:
    from lmcache.bench import WORKLOADS

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
        wp.set_defaults(func=module.run_cli)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lmcache`` command; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
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
