"""gemma-core's own notices (a compile that takes two minutes, a kept file that did not load): logged
on the "gemma_core" logger, and printed on stderr by the command line, whose quiet default turns
Python logging off (third-party log lines go only under --verbose) but must not make a minute of
compiling silent. A printer that fails (a closed stderr) drops the notice: it never stops the work
it tells of."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable

log = logging.getLogger("gemma_core")
_printers: list[Callable[[str], None]] = []


def notice(message: str, *args: object) -> None:
    """Log `message % args` as a warning; where logging is turned off and a printer is set
    (`printing`), print it there instead."""
    printer = next(iter(_printers[-1:]), None)  # (one read: another thread may pop it)
    if printer is not None and logging.root.manager.disable >= logging.WARNING:
        with contextlib.suppress(Exception):
            printer(message % args if args else message)
    else:
        log.warning(message, *args)


def _stderr(text: str) -> None:
    if sys.stderr is not None:  # (pythonw, a daemon: no stderr, and print would go to stdout)
        print(text, file=sys.stderr, flush=True)


class printing:
    """Within the block, notices that logging would drop go to `printer` (default: stderr)."""

    def __init__(self, printer: Callable[[str], None] | None = None) -> None:
        self.printer = printer or _stderr

    def __enter__(self) -> printing:
        _printers.append(self.printer)
        return self

    def __exit__(self, *exc: object) -> None:
        _printers.remove(self.printer)
