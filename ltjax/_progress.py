"""Progress bars for long host-side work (compress_tree, analyze, save, load, verify).

One tqdm bar over the leaves of a tree, counting their bytes and showing the current leaf's
path. ``progress=None`` (the default of every public function that takes it) shows the bar
only on a terminal (stderr is a TTY, tqdm's ``disable=None``), only for non-trivial work
(more than `AUTO_MIN_LEAVES` leaves or `AUTO_MIN_BYTES` bytes) and only once the work has
run `AUTO_DELAY_S` seconds, so pipes, logs, tests and small calls stay quiet.
``progress=True`` always shows it (on stderr, from the first leaf); ``False`` never does.
"""

from __future__ import annotations

import time
from typing import Any

AUTO_MIN_LEAVES = 8  # auto mode: more leaves than this, or
AUTO_MIN_BYTES = 64 * 1024 * 1024  # at least this many bytes,
AUTO_DELAY_S = 1.0  # and only after this long
MIN_INTERVAL_S = 0.1  # between redraws


class Progress:
    """A byte-counting bar over leaves; a no-op when disabled. Use as a context manager."""

    def __init__(self, desc: str, nbytes: int, n_leaves: int, progress: bool | None):
        if progress not in (None, True, False):
            raise ValueError(f"progress={progress!r} must be None (auto: on a terminal), True or False")
        self._bar = None
        if progress is False:
            return
        if progress is None and n_leaves <= AUTO_MIN_LEAVES and nbytes < AUTO_MIN_BYTES:
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=int(nbytes),
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=None if progress is None else False,  # None: only when stderr is a terminal
            delay=AUTO_DELAY_S if progress is None else 0.0,
            leave=False,
            mininterval=MIN_INTERVAL_S,
            dynamic_ncols=True,
        )

    def at(self, path: str) -> None:
        """Names the leaf now being worked on (redrawn at once if a redraw is due)."""
        b = self._bar
        if b is None:
            return
        b.set_postfix_str(path, refresh=False)
        if not b.disable:
            now = time.time()
            if now - b.last_print_t >= b.mininterval and now >= b.start_t + b.delay:
                b.refresh()
                b.last_print_t = now

    def step(self, nbytes: int, path: str = "") -> None:
        """Counts one leaf of ``nbytes`` bytes done (``path``: the leaf, if `at` did not name it)."""
        if self._bar is not None:
            if path:
                self._bar.set_postfix_str(path, refresh=False)
            self._bar.update(int(nbytes))

    def phase(self, desc: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(desc, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def leaf_nbytes(leaf: Any) -> int:
    """Bytes of an array or `CompressedTensor` leaf (0 for anything else)."""
    try:
        return int(getattr(leaf, "nbytes", 0) or 0)
    except (TypeError, ValueError):
        return 0
