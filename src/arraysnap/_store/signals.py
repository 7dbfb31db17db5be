"""Cadence and preemption: when a capture is due, and the signals that say "stop soon".

A watched signal (``signals=``) sets a flag and makes the next ``due()`` true, whatever the
policy, until the next capture; ``preempted`` turns true once ``due()`` has answered True
for it, so a loop that asks ``due()`` never exits without that last capture.

>>> import os, signal
>>> cadence = Cadence(None); cadence.watch((signal.SIGUSR2,))
>>> os.kill(os.getpid(), signal.SIGUSR2)
>>> cadence.preempted, cadence.due(0)
(True, True)
>>> cadence.close()
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable
from typing import Any

from ..policies import Policy

__all__ = ["DEFAULT_SIGNALS", "Cadence", "parse_signals"]

log = logging.getLogger("arraysnap")

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def parse_signals(signals: object) -> tuple[int, ...]:
    """The signals `signals=` asks for: True for SIGTERM and SIGUSR1, or a list of them.

    >>> parse_signals(True) == DEFAULT_SIGNALS, parse_signals(False)
    (True, ())
    """
    if signals is True:
        return DEFAULT_SIGNALS
    if signals is False or signals is None:
        return ()
    if isinstance(signals, int):
        signals = (signals,)
    if not isinstance(signals, Iterable):
        raise TypeError(f"signals= takes True (SIGTERM and SIGUSR1) or a list of signals, got "
                        f"{signals!r}")
    parsed = []
    for item in signals:
        try:
            parsed.append(signal.Signals(item))
        except (ValueError, TypeError):
            raise ValueError(f"signals=: {item!r} is not a signal number; use e.g. "
                             "signal.SIGTERM") from None
    return tuple(parsed)


class Cadence:
    """The ``every=`` policy and the watched signals of one writer; see the module doc."""

    def __init__(self, policy: Policy | None) -> None:
        self.policy = policy
        self._preempted = False  # a watched signal arrived
        self._pending = False  # ... and no capture has followed it yet
        self._seen = False  # ... and due() has answered True for it
        self._due_asked = False
        self._closed = False
        self._old_handlers: dict[int, Any] = {}
        self._closed_handlers: dict[int, Any] = {}

    def watch(self, signums: tuple[int, ...]) -> None:
        """Install the handlers of `signums` (a writer does, once it has opened)."""
        if not signums:
            return
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("signals= must be set by a store opened in the main thread "
                             "(Python delivers signals there)")
        for signum in signums:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)

    def due(self, step: int | None) -> bool:
        self._due_asked = True
        if self._pending:
            self._seen = True
            return True
        return self.policy is not None and self.policy.due(step)

    @property
    def preempted(self) -> bool:
        return self._preempted and (self._seen or not self._due_asked)

    def captured(self, step: int | None, wall: float, blocking: float) -> None:
        if self.policy is not None:
            self.policy.captured(step, wall, blocking)
        if self._pending:
            # A capture followed the signal (even one due for another reason, with the
            # signal landing during it): the loop may stop now.
            self._seen = True
        self._pending = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only flags: the loop captures at its next safe point, never from in here.
        previous = self._old_handlers.get(signum, self._closed_handlers.get(signum))
        if self._closed:
            # Closed, but another store installed its handler over ours and kept ours as its
            # "previous": act as if ours had been removed.
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self._preempted = True
        self._pending = True
        if callable(previous):
            previous(signum, frame)

    def close(self) -> None:
        """Put the previous handlers back (where ours is still the one installed)."""
        self._closed = True
        while self._old_handlers:
            signum, previous = self._old_handlers.popitem()
            # Kept for the case where another store chained to our handler (see _on_signal).
            self._closed_handlers[signum] = previous
            try:
                if signal.getsignal(signum) == self._on_signal:
                    signal.signal(signum, previous)
            except ValueError:  # not the main thread (close at exit from another thread)
                log.warning("arraysnap: could not restore the handler of signal %d", signum)
