"""A stop asked for by a signal, kept where the training loop looks for it.

A signal handler that raises (KeyboardInterrupt for SIGTERM) raises wherever the main thread
happens to be, and a few places swallow what they raise: a finalizer, a weakref callback
(SQLAlchemy's connection cleanup), `__del__`. Python prints "Exception ignored" and goes on, and
a training run asked to stop trained for ten more minutes. So the handler also sets this event,
and the trainer checks it before every step.
"""

from __future__ import annotations

import threading

STOP_REQUESTED = threading.Event()


class StopRequested(KeyboardInterrupt):
    """Raised by the training loop when a stop was asked for (SIGTERM) and its first raise was lost."""
