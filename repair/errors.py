"""Errors with the exit codes the CLI maps them to.

0 ok, 1 gate failed / verification failed, 2 bad input or usage, 3 internal error.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class RepairError(Exception):
    exit_code = 3


class BadInput(RepairError):
    """A user-supplied file or argument is unusable. One line: the file and the problem."""
    exit_code = 2

    def __init__(self, problem: str, path: Optional[Union[str, Path]] = None):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnknownName(BadInput, KeyError):
    """A name no registry holds (a method, a model family): a bad input, and a ``KeyError`` for the
    callers that look a name up and fall back."""

    def __str__(self) -> str:          # KeyError's own would quote the message
        return BadInput.__str__(self)


class GateFailed(RepairError):
    """A CI gate (--fail-under-*) or an export verification did not pass."""
    exit_code = 1


class ZooModelsFailed(RepairError):
    """Models of a zoo that could not be run (after the others ran): the worst of their exit codes,
    2 (a model's input) or 3 (our bug), not the gate's 1."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = int(exit_code)


class Terminated(BaseException):
    """SIGTERM (what CI timeouts and ``kill`` send), raised in the main thread like Ctrl-C so every
    output transaction unwinds and removes its temporaries; the CLI exits 143."""
