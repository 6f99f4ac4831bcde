"""Progress display shared by the long-running commands (phantoms, preprocessing, benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_counter(enabled: bool, total: int, description: str) -> Iterator[Callable[[], None]]:
    """Yield an ``advance()`` callable that counts one finished item; a rich progress bar when enabled."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
