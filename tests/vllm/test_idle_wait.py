"""The vLLM connector's idle-step wait (``lmcache.integrations.vllm.idle``), without vLLM.

On a step without a forward pass, ``get_finished`` waits (GIL released) for an asynchronous load
in flight, so the load thread is not starved by vLLM's empty steps; a step with a forward pass
never waits. Nothing here is timed: the loads are futures the test completes itself.
"""

from __future__ import annotations

import concurrent.futures
import threading
import types

from lmcache.integrations.vllm.idle import IDLE_WAIT_S, IdleWait, is_idle_step

NO_FORWARD = types.SimpleNamespace(attn_metadata=None)  # vLLM's kv_connector_no_forward context
FORWARD = types.SimpleNamespace(attn_metadata={"model.layers.0.self_attn.attn": object()})


def test_steps_without_attention_metadata_are_idle() -> None:
    assert is_idle_step(NO_FORWARD)
    assert is_idle_step(None)
    assert not is_idle_step(FORWARD)


def test_an_idle_step_waits_for_a_load_that_finishes_during_the_wait() -> None:
    """The load ends while get_finished waits, and that same call sees it (before: reported a step later)."""
    fut: concurrent.futures.Future[set[int]] = concurrent.futures.Future()

    def load() -> None:
        # Finish only once the step is waiting on the future (concurrent.futures.wait registers
        # a waiter on it), so the future is certainly not done when the wait starts.
        while not fut._waiters:  # type: ignore[attr-defined]
            threading.Event().wait(0.001)
        fut.set_result(set())

    loader = threading.Thread(target=load)
    loader.start()
    idle = IdleWait(timeout=60.0)  # never reached: the load ends the wait
    idle.step(NO_FORWARD)
    assert idle.wait([fut])
    assert fut.done()
    assert idle.waits == 1
    loader.join()


def test_a_step_with_a_forward_pass_never_waits() -> None:
    fut: concurrent.futures.Future[set[int]] = concurrent.futures.Future()
    idle = IdleWait(timeout=60.0)  # a wait would hang the test for a minute
    idle.step(FORWARD)
    assert not idle.wait([fut])
    assert not fut.done() and idle.waits == 0


def test_the_wait_is_bounded_and_once_per_step() -> None:
    """A load that does not finish ends the wait after the timeout; the same step does not wait again."""
    fut: concurrent.futures.Future[set[int]] = concurrent.futures.Future()
    idle = IdleWait()
    assert idle.timeout == IDLE_WAIT_S
    idle.step(NO_FORWARD)
    assert idle.wait([fut])
    assert not fut.done()
    assert not idle.wait([fut])  # the step was consumed
    assert idle.waits == 1


def test_nothing_in_flight_or_already_done_does_not_wait() -> None:
    idle = IdleWait(timeout=60.0)
    idle.step(NO_FORWARD)
    assert not idle.wait([])
    done: concurrent.futures.Future[set[int]] = concurrent.futures.Future()
    done.set_result(set())
    idle.step(NO_FORWARD)
    assert not idle.wait([done])
    assert idle.waits == 0
