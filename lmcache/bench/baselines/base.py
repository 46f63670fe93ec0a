"""The :class:`Baseline` interface of ``lmcache bench backend``: the raw operation a backend is measured against.

A baseline moves the same bytes between the same source and destination buffers as the backend
under test, with the store's own SDK (or the hardware operation) and nothing lmcache adds. This
module holds only the interface; the baselines themselves are the other modules of
:mod:`lmcache.bench.baselines`, one per store.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["Baseline", "BaselineFactory"]


class Baseline(ABC):
    """The raw operation a backend is measured against, run on the same slots and buffers.

    Subclasses set :attr:`name` and implement :meth:`put_batch` and :meth:`get_batch`. A round
    calls ``put_batch`` for every batch of slots, then ``get_batch`` for every batch, then
    :meth:`end_round`; batches of one phase may run concurrently (up to ``--concurrency``).
    """

    #: Short name for tables and JSON, e.g. ``"memcpy"``.
    name: ClassVar[str] = "baseline"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (connections, scratch space); called once before the first round."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release everything; called once, also after a failure."""

    async def end_round(self) -> None:  # noqa: B027 - optional hook
        """Drop what this round stored (the backend's keys are deleted at the same point)."""

    @abstractmethod
    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        """Store ``srcs[i]`` as the value of ``slots[i]``."""

    @abstractmethod
    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        """Read the value of ``slots[i]`` into ``dsts[i]``; return bytes read per slot."""

    def describe(self) -> dict[str, Any]:
        """What exactly this baseline does, for the JSON report."""
        return {"name": self.name, "doc": (type(self).__doc__ or "").strip().split("\n")[0]}


#: A factory gets the backend under test (built, not opened) and the workload, and returns a
#: baseline, or None where no raw equivalent exists for that configuration. It may return a
#: list: the first is the baseline that ratios refer to, the others run as extra systems in the
#: same rounds (e.g. a wire-level ceiling next to the raw SDK), each reported as backend / it.
BaselineFactory = Callable[["StorageBackend", "Workload"], "Baseline | Sequence[Baseline] | None"]
