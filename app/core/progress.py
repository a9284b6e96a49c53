"""Progress of long jobs (`seqguard score`, `export`, `evaluate`, `train`): the callbacks
the jobs report through, and the rich bars the command line draws from them.

The jobs know nothing of bars: they call an optional ``on_progress(done, total)`` (units
of work: events, batches) or tell a :class:`Steps` which named step begins. The command
line turns either into a task of :func:`bars`, which draws on stderr only when it is a
terminal (and the caller allows it: not with JSON or plain logs), so files, pipes and log
shippers get no bar, not even its last frame.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from app.core import logs

#: ``on_progress(done, total)``: how much of a job's work is done, in its units (events...).
OnProgress = Callable[[int, int], None]
#: ``on_step(name, done, total)``: step ``name`` begins after ``done`` of ``total`` steps.
OnStep = Callable[[str, int, int], None]


class Steps:
    """A job's named steps, told to ``on_step`` as each begins (``None``: to nobody).

    >>> seen = []
    >>> steps = Steps(2, lambda *told: seen.append(told))
    >>> steps.begin("parity check"); steps.begin("report"); steps.end()
    >>> seen
    [('parity check', 0, 2), ('report', 1, 2), ('done', 2, 2)]
    """

    def __init__(self, total: int, on_step: OnStep | None = None) -> None:
        self.total = total
        self._on_step = on_step
        self._begun = 0

    def begin(self, name: str) -> None:
        """Step ``name`` begins (the one before it, if any, is done)."""
        if self._on_step is not None:
            self._on_step(name, self._begun, max(self.total, self._begun + 1))
        self._begun += 1

    def end(self) -> None:
        """The last step is done."""
        if self._on_step is not None:
            self._on_step("done", self._begun, self._begun)


def bars(enabled: bool = True, console: Console | None = None) -> Progress:
    """A rich progress display (``with bars(...) as p:``) on ``console``: description, bar,
    done/total, elapsed time. Disabled, drawing nothing at all, unless ``enabled`` and the
    console is a terminal. The default console is the logs' (records then go above the
    bar: :func:`app.core.logs.console`), else stderr."""
    console = console or logs.console() or Console(stderr=True)
    # rich's is_terminal honours FORCE_COLOR / TTY_COMPATIBLE (common in CI); a bar needs a real terminal
    real = console.is_terminal and _isatty(console.file)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=not (enabled and real))


def _isatty(file: object) -> bool:
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed file
        return False


def counter(progress: Progress, description: str, total: int | None = None) -> OnProgress:
    """An ``on_progress(done, total)`` that moves a new task of ``progress``."""
    task = progress.add_task(description, total=total)
    return lambda done, total: progress.update(task, completed=done, total=total)


def stepper(progress: Progress, description: str, before: str = "") -> OnStep:
    """An ``on_step(name, done, total)`` that shows each step on a new task of
    ``progress`` as ``description: name``; until the first step, ``description: before``
    (what the caller does before the job's steps begin)."""
    task: TaskID = progress.add_task(f"{description}: {before}" if before else description, total=None)

    def on_step(name: str, done: int, total: int) -> None:
        progress.update(task, description=f"{description}: {name}", completed=done, total=total)

    return on_step
