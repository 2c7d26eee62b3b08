"""loupe.heap.release under a signal: the interrupt is raised after the collection, not lost."""

from __future__ import annotations

import gc
import os
import signal
import weakref

import pytest

from loupe import heap, interrupt


class Node:
    pass


@pytest.mark.unit
def test_a_sigterm_during_the_collection_is_raised_not_lost():
    """Found in CI: a probe worker's SIGTERM landed in a weakref callback run by the collection,
    was printed as an ignored exception, and the worker went on to the next checkpoint."""
    with interrupt.handlers():
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: freed only by the collection
        fired = []

        def callback(_ref):
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside this callback

        ref = weakref.ref(a, callback)
        del a, b
        gc.disable()
        try:
            with pytest.raises(interrupt.Interrupted):
                heap.release()
        finally:
            gc.enable()
            interrupt.reset()
        assert fired and ref() is None
