"""Library chatter kept off the user's terminal while a command works: diffusers' and transformers' progress
bars, ONNX Runtime's and torch's warnings write to stderr, where the user must see only our one error line.

Both levels are redirected: Python's sys.stderr (tqdm, warnings, logging) and file descriptor 2 (ONNX Runtime's
and other C++ loggers). What they wrote is kept in a temporary file and dropped: on success it is noise; on
a user error the one line says what to do; an internal error's traceback goes to its own crash log.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    sys.stderr.flush()
    try:
        saved_fd = os.dup(2)
    except OSError:  # no fd 2 (a daemon): nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stderr(sink), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the library's warnings; ours are UserErrors
                yield
        finally:
            sink.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
