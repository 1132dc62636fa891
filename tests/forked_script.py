"""The end of a forked child that runs a script's code as ``python SCRIPT`` would: the exit
status its interpreter would give, without the exit handlers of the process it was forked from
(a test process's: its job servers' stop, say), which are not the child's to run."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def exit_status(exit: SystemExit) -> int:
    """The exit status Python gives a process ended by ``exit``: its code when an int, 0 for
    None, else 1 with the code written to stderr (as ``sys.exit("message")``)."""
    if exit.code is None:
        return 0
    if isinstance(exit.code, int):
        return exit.code & 0xFF
    print(exit.code, file=sys.stderr)
    return 1


def run_then_exit(script: Callable[[], None]) -> NoReturn:
    """In a forked child: call ``script`` (which runs the script's code), then end the child
    with status 0, a ``SystemExit``'s status, or 1 after printing the traceback of any other
    exception, its output flushed; by ``os._exit`` (see the module doc)."""
    status = 1
    try:
        script()
        status = 0
    except SystemExit as exc:
        status = exit_status(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)
