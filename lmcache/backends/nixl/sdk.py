"""The NIXL SDK as ``nixl://`` and ``nixl+posix://`` use it: loading, agents, registration, transfers.

Every function here blocks (run it on an executor or a lane thread, never on the event loop) and
maps SDK failures to :class:`~lmcache.errors.BackendUnavailableError` /
:class:`~lmcache.errors.BackendTimeoutError`. Regions are ``(address, length, device)`` tuples,
as NIXL's descriptor lists take them.

Progress threads (the peer's always, a client's with ``progress_thread=true``) sleep until UCX
has an event: NIXL's Python API makes them poll without pause, and an idle peer took a whole
core (see :func:`make_agent`).

This module is public within lmcache: the raw ``nixl://`` benchmark baseline
(:mod:`lmcache.bench.baselines.nixl`) makes its agent and moves its bytes with these functions,
so that it measures the same SDK calls the backend makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from lmcache.errors import BackendError, BackendTimeoutError, BackendUnavailableError, MissingDependencyError

__all__ = [
    "PROGRESS_POLL_US",
    "Xfer",
    "finish",
    "import_nixl",
    "is_done",
    "make_agent",
    "post",
    "register",
    "registered",
    "transfer",
    "wait",
]

logger = logging.getLogger(__name__)

#: Poll timeout of a NIXL progress thread, in microseconds (see :func:`make_agent`).
PROGRESS_POLL_US = 100_000


def import_nixl() -> Any:
    """NIXL's Python API module (``nixl._api``, else ``nixl_cu12._api`` / ``nixl_cu13._api``).

    Raises:
        MissingDependencyError: NIXL is not installed.
    """
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("nixl", "nixl", "the nixl:// backend")


_POLL = threading.local()  # the progress thread's poll timeout for agents made by this thread


def _hook_poll_timeout(api: Any) -> bool:
    """Let :func:`make_agent` choose the progress thread's poll timeout (NIXL's ``pthrDelay``).

    NIXL's Python API always passes ``pthrDelay=0``: its UCX progress thread then polls the
    worker without pause and takes a whole core even when idle. With a timeout, the thread arms
    the worker and sleeps in ``poll()`` until the worker signals an event (incoming data, a
    completion) or the timeout passes, so it costs nothing while idle. The API offers no way to
    set it, so the binding's config class is replaced, once, by a subclass whose ``pthrDelay``
    takes the value this thread asked for, and otherwise the one given (other users of NIXL in
    the process see no change). False when this NIXL build has no such field.
    """
    bind = getattr(api, "nixlBind", None)
    base = getattr(bind, "nixlAgentConfig", None)
    if base is None:
        return False
    if getattr(base, "_lmcache_poll_hook", False):
        return True
    field = getattr(base, "pthrDelay", None)
    if field is None or not hasattr(field, "__set__"):
        return False

    try:

        class _Config(base):  # type: ignore[misc, valid-type]
            _lmcache_poll_hook = True

            @property
            def pthrDelay(self) -> int:
                return int(field.__get__(self))

            @pthrDelay.setter
            def pthrDelay(self, value: int) -> None:
                wanted = getattr(_POLL, "us", None)
                field.__set__(self, value if wanted is None else wanted)

    except TypeError as exc:  # a binding class that cannot be subclassed: keep NIXL's default
        logger.debug("NIXL: cannot set the progress thread's poll timeout (%s)", exc)
        return False
    bind.nixlAgentConfig = _Config
    return True


def make_agent(name: str, backends: list[str], prog_thread: bool, ucx_workers: int = 1) -> Any:
    """A NIXL agent with ``backends``; its progress thread (if any) waits for events, not spins.

    With one UCX worker the agent serializes its calls (``STRICT``): a transfer the host CPU
    copies (CMA, TCP) then holds it for the whole copy, so copies run one at a time. With
    ``ucx_workers > 1`` the agent takes a shared lock for transfers (``RW``) and UCX gets that
    many workers (NIXL picks one per calling thread), so threads copy in parallel.
    """
    api = import_nixl()
    try:
        sync = (
            api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
            if ucx_workers <= 1
            else api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
        )
        cfg = api.nixl_agent_config(
            enable_prog_thread=prog_thread,
            enable_listen_thread=False,
            backends=backends if ucx_workers <= 1 else [b for b in backends if b != "UCX"],
            sync_mode=sync,
        )
        hooked = prog_thread and _hook_poll_timeout(api)
        if hooked:
            _POLL.us = PROGRESS_POLL_US
        try:
            agent = api.nixl_agent(name, cfg)
            if ucx_workers > 1 and "UCX" in backends:
                agent.create_backend("UCX", {"num_workers": str(ucx_workers)})
        finally:
            if hooked:
                _POLL.us = None
    except Exception as exc:
        raise BackendUnavailableError(f"NIXL: creating agent {name} failed: {type(exc).__name__}: {exc}") from None
    missing = [b for b in backends if b not in agent.backends]
    if missing:
        raise BackendUnavailableError(f"NIXL: the {', '.join(missing)} backend plugin is not available here")
    return agent


@dataclasses.dataclass
class Xfer:
    """A posted NIXL transfer: its handle, and whether it is known to be done.

    A transfer the host CPU copies (UCX over CMA) is done when posted. Knowing that saves the
    state polls, each of which takes the agent's lock that the other threads' copies hold.
    """

    handle: Any
    done: bool


def post(
    agent: Any,
    op: str,
    *,
    local: list[tuple[int, int, int]],
    local_type: str,
    remote: list[tuple[int, int, int]],
    remote_type: str,
    remote_agent: str,
) -> Xfer | None:
    """Start one NIXL transfer (finish it with :func:`wait`); None if there is nothing to move.

    Raises:
        BackendUnavailableError: NIXL refused the transfer.
    """
    if not local:
        return None
    try:
        handle = agent.initialize_xfer(
            op, agent.get_xfer_descs(local, local_type), agent.get_xfer_descs(remote, remote_type), remote_agent
        )
    except Exception as exc:
        raise BackendUnavailableError(f"NIXL: preparing a {op} failed: {type(exc).__name__}: {exc}") from None
    try:
        state = agent.transfer(handle)
    except Exception as exc:
        with contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)
        raise BackendUnavailableError(f"NIXL: posting a {op} failed: {type(exc).__name__}: {exc}") from None
    if state == "ERR":
        with contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)
        raise BackendUnavailableError(f"NIXL: a {op} to {remote_agent} failed when posted")
    return Xfer(handle, state == "DONE")


def is_done(agent: Any, xfer: Xfer | None) -> bool:
    """Whether a posted transfer has finished (progresses it once; errors are left to :func:`wait`)."""
    if xfer is None or xfer.done:
        return True
    try:
        return bool(agent.check_xfer_state(xfer.handle) != "PROC")
    except Exception:
        return True


def wait(agent: Any, xfer: Xfer | None, timeout: float) -> None:
    """Poll a posted transfer to completion and release its handle (always, even on failure).

    Raises:
        BackendTimeoutError: Not done within ``timeout`` seconds.
        BackendUnavailableError: The transfer failed.
    """
    if xfer is None or xfer.handle is None:
        return  # nothing posted, or done and released by the lane (see lmcache.backends.nixl.lanes)
    handle = xfer.handle
    try:
        state = "DONE" if xfer.done else agent.check_xfer_state(handle)
        deadline = time.monotonic() + timeout
        spins = 0
        while state == "PROC":
            spins += 1
            if spins > 200:
                # Past a short spin, yield the core: the progress thread needs it on small hosts.
                time.sleep(0.00005)
                if time.monotonic() > deadline:
                    raise BackendTimeoutError(f"NIXL: a transfer did not finish within {timeout:g} s")
            state = agent.check_xfer_state(handle)
        if state != "DONE":
            raise BackendUnavailableError(f"NIXL: a transfer failed ({state})")
    except BackendError:
        raise
    except Exception as exc:
        raise BackendUnavailableError(f"NIXL: a transfer failed: {type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)


def finish(agent: Any, handles: list[Xfer | None], timeout: float) -> BackendError | None:
    """Wait for every posted transfer in ``handles`` (None entries are done); the first failure."""
    failure: BackendError | None = None
    for i, handle in enumerate(handles):
        handles[i] = None
        try:
            wait(agent, handle, timeout)
        except BackendError as exc:
            failure = failure or exc
    return failure


def transfer(
    agent: Any,
    op: str,
    *,
    local: list[tuple[int, int, int]],
    local_type: str,
    remote: list[tuple[int, int, int]],
    remote_type: str,
    remote_agent: str,
    timeout: float,
) -> None:
    """One NIXL transfer, posted and polled to completion (blocking; run it on an executor).

    Raises:
        BackendTimeoutError: Not done within ``timeout`` seconds.
        BackendUnavailableError: NIXL refused or failed the transfer.
    """
    handle = post(
        agent,
        op,
        local=local,
        local_type=local_type,
        remote=remote,
        remote_type=remote_type,
        remote_agent=remote_agent,
    )
    wait(agent, handle, timeout)


def register(agent: Any, regions: list[tuple[int, int, int]], mem_type: str) -> Any:
    """Register ``(addr, len, dev)`` regions (deduplicated, empty ones skipped); None if none.

    Raises:
        BackendUnavailableError: NIXL refused.
    """
    unique = sorted({r for r in regions if r[1] > 0})
    if not unique:
        return None
    try:
        return agent.register_memory([(a, n, d, "") for a, n, d in unique], mem_type)
    except Exception as exc:
        raise BackendUnavailableError(
            f"NIXL: registering {mem_type} memory failed: {type(exc).__name__}: {exc}"
        ) from None


@contextlib.contextmanager
def registered(agent: Any, regions: list[tuple[int, int, int]], mem_type: str) -> Iterator[None]:
    """Register ``(addr, len, dev)`` regions (deduplicated) for the duration of the block."""
    reg = register(agent, regions, mem_type)
    try:
        yield
    finally:
        if reg is not None:
            with contextlib.suppress(Exception):
                agent.deregister_memory(reg)
