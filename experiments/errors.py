"""Bad input to a command: the one error that ``hardtovary`` prints as one line instead of a traceback.

A command's options, the data files it reads and the run folder it writes are the user's input. What is wrong with
them raises :class:`UsageError`: the commands when they turn options into configurations (:func:`usage_errors`),
and the experiments where only they can tell (a batch larger than an environment, a run folder that holds another
configuration, a malformed data file). Every other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import contextlib


class UsageError(ValueError):
    """Bad input on the command line, in a data file or in a run folder. ``hardtovary`` prints it as one line,
    ``hardtovary COMMAND: error: ...``, and exits with status 2. A ValueError, so that code calling the experiments
    from Python catches it as before."""


@contextlib.contextmanager
def usage_errors():
    """Turn the ValueError or TypeError raised inside the block into a :class:`UsageError` with the same message.
    For the step where a command validates its options by building configurations from them; the work that follows
    must run outside the block, so that its errors keep their tracebacks."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
