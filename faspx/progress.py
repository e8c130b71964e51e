"""A progress bar for work made of a few long blocking steps (an ONNX export, a session load).

tqdm redraws only when a step ends; a step that takes minutes would show a frozen bar. ``steps``
keeps tqdm's clock moving (one redraw a second, from a daemon thread) and names the current step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tqdm.auto import tqdm


class Steps:
    """What ``steps`` yields: ``next(name)`` ends the current step and names the one that starts."""

    def __init__(self, bar: tqdm):
        self.bar, self.started = bar, False

    def next(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_postfix_str(name)


@contextlib.contextmanager
def steps(desc: str, total: int, enabled: bool = True) -> Iterator[Steps]:
    """A bar of ``total`` named steps whose elapsed time moves during each.

    Example:
        >>> with steps("export", 2, enabled=False) as s:
        ...     s.next("trace"); s.next("save")
    """
    bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled,
               bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    if enabled:
        ticker.start()
    try:
        state = Steps(bar)
        yield state
        if state.started:
            bar.set_postfix_str("done", refresh=False)
            bar.update(1)
    finally:
        done.set()
        if enabled:
            ticker.join()
        bar.close()
