"""Progress bars for long work (training, sampling, Inception features), one policy everywhere."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h', '2.1 days', '8,000 years': a duration as a person reads it."""
    for unit, size, from_count in (("years", 365.25 * 86400, 2), ("days", 86400, 2), ("h", 3600, 2), ("min", 60, 1.5)):
        if seconds >= from_count * size:
            value = seconds / size
            return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.2g} {unit}"
    return f"{seconds:.0f} s"


def progress_bar(iterable=None, **options) -> tqdm:
    """A tqdm bar that redraws live in a terminal, but only every 30 s into a log file (a worker's
    log or CI), where every redraw is another line."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.1 if interactive else 30, dynamic_ncols=interactive, **options)
