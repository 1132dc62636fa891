"""A part of a test run as an unprivileged user, in a forked child: the tests run as root,
which ignores directory permissions, and a job of an ordinary user does not."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

#: the user and group ``nobody``
NOBODY = 65534


def succeeds_as_nobody(action: Callable[[], object]) -> bool:
    """Whether ``action`` returns (True) or raises (False; its traceback is printed) when run
    in a child forked from this process (which must be root) that became user and group
    ``nobody``. What ``action`` imports lazily must be readable by that user: the
    interpreter's installation may not be, so use it once before."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit status
        status = 3
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            status = 0
        except BaseException:
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status) == 0
