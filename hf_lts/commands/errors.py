"""User mistakes on the command line: one ``hf-lts <command>: error: …`` line and exit status 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NoReturn

from transformers import HfArgumentParser


class UsageError(Exception):
    """A mistake of the user's: reported as one line, exit status 2."""


class Parser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one line (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@contextlib.contextmanager
def user_errors(context: str | None = None) -> Iterator[None]:
    """Turn the errors that a bad argument, path or dataset raises into a `UsageError`."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as e:
        message = one_line(e)
        raise UsageError(f"{context}: {message}" if context else message) from e


def one_line(error: BaseException | str) -> str:
    return " ".join(str(error).split()) or type(error).__name__
