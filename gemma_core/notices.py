"""gemma-core's own notices (a compile that takes a minute, a kept file that did not load): logged
on the "gemma_core" logger, and printed on stderr by the command line, whose quiet default turns
Python logging off (third-party log lines go only under --verbose) but must not make a minute of
compiling silent."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

log = logging.getLogger("gemma_core")
_printers: list[Callable[[str], None]] = []


def notice(message: str, *args: object) -> None:
    """Log `message % args` as a warning; where logging is turned off and a printer is set
    (`printing`), print it there instead."""
    if _printers and logging.root.manager.disable >= logging.WARNING:
        _printers[-1](message % args if args else message)
    else:
        log.warning(message, *args)


class printing:
    """Within the block, notices that logging would drop go to `printer` (default: stderr)."""

    def __init__(self, printer: Callable[[str], None] | None = None) -> None:
        self.printer = printer or (lambda text: print(text, file=sys.stderr, flush=True))

    def __enter__(self) -> printing:
        _printers.append(self.printer)
        return self

    def __exit__(self, *exc: object) -> None:
        _printers.remove(self.printer)
