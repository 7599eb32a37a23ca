"""Progress bars for long work (training, sampling, Inception features), one policy everywhere."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, **options) -> tqdm:
    """A tqdm bar that redraws live in a terminal, but only every 30 s into a log file (a worker's
    log or CI), where every redraw is another line."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, mininterval=0.1 if interactive else 30, dynamic_ncols=interactive, **options)
