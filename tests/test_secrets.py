"""Secrets in backend URLs need not be on a command line (issue 17 §4).

Every secret option (``secret=True`` settings, and the URL password) can come from a file
(``<option>_file=/path``, or ``LMCACHE_<SCHEME>_<OPTION>_FILE``) or the environment, and a secret
given on the command line (``lmcache server --tier``, and any other ``lmcache`` command's URL
argument) is logged as a warning, redacted.
"""

from __future__ import annotations

import argparse
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import redis_server_binary, start_redis

import lmcache
from lmcache.backends.registry import TIER_URL_HELP, command_line_secrets, warn_command_line_secrets
from lmcache.errors import AuthError, ConfigError
from lmcache.keys import KeyScope

KEY = KeyScope.create("m").key(b"\x05" * 32)


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A local redis-server started with ``--requirepass``: its port and password."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no Redis server: install redis-server (apt-get install -y redis-server)")
    password = secrets.token_hex(16)
    proc = start_redis(binary, tmp_path_factory.mktemp("redis-pw"), args=["--requirepass", password], name="redis-pw")
    try:
        yield proc.port, password  # type: ignore[misc]
    finally:
        proc.stop()


async def _round_trip(url: str) -> bytes:
    backend = lmcache.open_backend(url)
    async with backend:
        await backend.delete([KEY])
        assert (await backend.put([KEY], [b"secret value"]))[0].ok
        dst = bytearray(64)
        [n] = await backend.get_into([KEY], [dst])
        assert n is not None
        return bytes(dst[:n])


async def test_password_file_authenticates(redis_with_password: tuple[int, str], tmp_path: Path) -> None:
    port, password = redis_with_password
    with pytest.raises(AuthError):
        await _round_trip(f"redis://127.0.0.1:{port}/0")  # the server does require it
    pw_file = tmp_path / "redis.pw"
    pw_file.write_text(password + "\n")  # as `echo pw > file` writes it
    url = f"redis://127.0.0.1:{port}/0?password_file={pw_file}"
    assert await _round_trip(url) == b"secret value"
    backend = lmcache.open_backend(url)
    assert password not in repr(backend)
    pw_file.write_text("wrong\n")
    with pytest.raises(AuthError):
        await _round_trip(url)


async def test_password_file_from_the_environment(
    redis_with_password: tuple[int, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, password = redis_with_password
    pw_file = tmp_path / "redis.pw"
    pw_file.write_text(password)
    monkeypatch.setenv("LMCACHE_REDIS_PASSWORD_FILE", str(pw_file))
    assert await _round_trip(f"redis://127.0.0.1:{port}/0") == b"secret value"


def test_secret_files_that_cannot_be_used_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read password_file"):
        lmcache.open_backend(f"redis://127.0.0.1:6379/0?password_file={tmp_path}/missing")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        lmcache.open_backend(f"redis://127.0.0.1:6379/0?password_file={tmp_path}/empty")
    (tmp_path / "pw").write_text("x")
    with pytest.raises(ConfigError, match="both set password"):
        lmcache.open_backend(f"redis://127.0.0.1:6379/0?password=y&password_file={tmp_path}/pw")
    # Only secret options take a file: anything else stays an unknown option.
    with pytest.raises(ConfigError, match="unknown option 'prefix_file'"):
        lmcache.open_backend(f"redis://127.0.0.1:6379/0?prefix_file={tmp_path}/pw")


def test_every_secret_option_takes_a_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok\n")
    assert lmcache.open_backend(f"lm://127.0.0.1:8198?token_file={tmp_path}/token").settings.token == "tok"


@pytest.mark.parametrize(
    ("url", "found"),
    [
        ("redis://user:hunter2@127.0.0.1:6379/0", ["password"]),
        ("redis://:hunter2@127.0.0.1:6379/0", ["password"]),
        ("lm://127.0.0.1:8198?token=abc", ["token"]),
        ("redis://127.0.0.1:6379/0?password_file=/run/secrets/redis", []),
        ("redis://user@127.0.0.1:6379/0", []),
        ("memory://?capacity=1GiB", []),
    ],
)
def test_command_line_secrets_are_found(url: str, found: list[str]) -> None:
    assert command_line_secrets(url) == found


def test_a_secret_on_the_server_command_line_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from lmcache.cli import build_parser
    from lmcache.server.daemon import build_server

    args = build_parser().parse_args(
        ["server", "--tier", "memory://?capacity=1MiB", "--tier", "redis://:hunter2@127.0.0.1:6379/0", "--port", "0"]
    )
    with caplog.at_level(logging.WARNING):
        build_server(args)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "--tier" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    text = warnings[0].getMessage()
    assert "hunter2" not in text and "password_file=" in text and "LMCACHE_REDIS_" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "redis://:hunter2@127.0.0.1:1/0"],
        ["stats", "tiered://?tier=memory%3A%2F%2F&tier=redis%3A%2F%2F%3Ahunter2%40127.0.0.1%3A1%2F0"],
        ["bench", "backend", "--url", "s3://b/p?secret_access_key=hunter2", "--total", "1MiB"],
    ],
)
def test_secrets_in_other_commands_urls_are_warned_about(argv: list[str], caplog: pytest.LogCaptureFixture) -> None:
    from lmcache.cli import _warn_url_secrets, build_parser

    with caplog.at_level(logging.WARNING):
        _warn_url_secrets(build_parser().parse_args(argv))  # before any connection is tried
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "hunter2" not in warnings[0] and "_file=" in warnings[0]


def test_no_warning_for_a_url_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert not warn_command_line_secrets("redis://127.0.0.1:6379/0?password_file=/x", "--tier")
    assert not caplog.records


def test_tier_help_says_where_secrets_go() -> None:
    from lmcache.server.daemon import add_server_arguments

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "password_file=" in help_text and "LMCACHE_<SCHEME>_<OPTION>" in help_text
    assert "_file=" in TIER_URL_HELP
