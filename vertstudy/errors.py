"""One error base for everything a user can get wrong.

The CLI turns a :class:`VertstudyError` into one line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class VertstudyError(Exception):
    """Base of every error caused by user input (files, options, configs)."""


class InputError(VertstudyError):
    """A bad input file: names the file and says what is wrong and what is accepted."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable across worker processes
        return (type(self), (self.path, self.problem))


class ConfigError(VertstudyError):
    """A bad configuration value: names the field, the bad value and what is accepted."""


class StorageError(VertstudyError):
    """The storage refused a write (a full disk, a quota): names the location, says what was kept
    and how to continue."""
