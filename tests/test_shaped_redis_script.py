"""``scripts/shaped-redis.sh``: a redis-server behind a tc-shaped veth link, up and down again.

Needs root, ``ip``, ``tc`` and ``redis-server`` (skipped otherwise). Runs under its own
namespace, interface names, subnet and state folder, so it never meets a setup already up.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lmcache.backends.registry import open_backend
from lmcache.keys import CacheKey

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "shaped-redis.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(b) for b in ("ip", "tc", "redis-server")),
    reason="needs root, ip, tc and redis-server",
)


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=False, env=env, capture_output=True, text=True, timeout=60
    )


def names(what: list[str]) -> str:
    return subprocess.run(what, capture_output=True, text=True, check=True).stdout


async def round_trip(url: str) -> None:
    """A 3 MiB value put through the link and read back."""
    async with open_backend(url) as b:
        key = CacheKey("shaped-test", 1, 0, os.urandom(32), "bfloat16")
        value = os.urandom(3 << 20)
        assert (await b.put([key], [value]))[0].ok
        dst = bytearray(len(value))
        assert await b.get_into([key], [dst]) == [len(value)]
        assert bytes(dst) == value
        await b.delete([key])


def test_up_serves_redis_through_the_shaped_link_and_down_removes_everything(tmp_path: Path) -> None:
    tag = f"{os.getpid() % 100000}"
    state = tmp_path / "state"
    env = {
        **os.environ,
        "LMCACHE_SHAPED_NS": f"lmc-test-{tag}",
        "LMCACHE_SHAPED_DIR": str(state),
        "LMCACHE_SHAPED_IF": f"lmt{tag}",
        "LMCACHE_SHAPED_NET": f"10.214.{os.getpid() % 250}",
    }
    try:
        up = run(env, "up", "1gbit", "1mb")
        assert up.returncode == 0, up.stderr
        url = up.stdout.strip()
        assert url.startswith(f"redis://10.214.{os.getpid() % 250}.2:6379/0?password_file=")
        assert "password=" not in url.replace("password_file=", "")  # the secret stays in its file
        assert run(env, "url").stdout.strip() == url
        assert f"lmc-test-{tag}" in names(["ip", "netns", "list"])
        qdisc = names(["ip", "netns", "exec", f"lmc-test-{tag}", "tc", "qdisc", "show", "dev", f"lmt{tag}1"])
        assert "tbf" in qdisc and "1Gbit" in qdisc
        assert run(env, "up").returncode != 0  # already up: refused, and left as it was
        asyncio.run(round_trip(url))
        pid = int((state / "redis.pid").read_text())
    finally:
        down = run(env, "down")
    assert down.returncode == 0, down.stderr
    assert f"lmc-test-{tag}" not in names(["ip", "netns", "list"])
    assert f"lmt{tag}0" not in names(["ip", "-br", "link"])
    assert not state.exists()
    assert not Path(f"/proc/{pid}").exists() or "redis" not in Path(f"/proc/{pid}/comm").read_text()
    assert run(env, "down").returncode == 0  # idempotent
