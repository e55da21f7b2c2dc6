"""Progress bars for the slow evaluation steps: shown in a terminal, off in logs and pipes."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, unit: str) -> tqdm:
    """A tqdm bar over ``total`` units; ``disable=None`` turns it off when stderr is not a TTY.

    Use it as a context manager and ``update(n)`` as work completes; it clears itself when
    done, so a finished evaluation leaves only its log lines.
    """
    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)
