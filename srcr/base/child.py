"""Long native calls in a child process: Ctrl-C stops them at once, and a crash stays a one-line error.

A Python signal handler only runs between bytecodes, so Ctrl-C during a minutes-long C call
(llama.cpp's quantizer) waits for the call to end; worse, if the C code calls back into Python (a
log callback) the KeyboardInterrupt is raised there and discarded by ctypes. In a child process
the parent stays in Python, notices Ctrl-C at once and ends the child; a segfault in native code
ends only the child.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from typing import Any

from srcr.base.errors import SrcrError

_POLL_SECONDS = 0.1


def _child_main(function: Callable[..., Any], args: tuple[Any, ...], results: Any) -> None:
    # The terminal sends Ctrl-C to the whole process group: the child just dies, the parent reports.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        results.send(("ok", function(*args)))
    except SrcrError as error:
        results.send(("srcr_error", str(error)))
    except Exception as error:  # reported by the parent as one line
        results.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        results.close()


def run_in_child(what: str, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a fresh (spawned) process; its return value and arguments must pickle.

    SrcrError in the child is re-raised as SrcrError; a crash (signal) or other error becomes a
    SrcrError naming `what`; KeyboardInterrupt in the parent ends the child and propagates.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(function, args, send), daemon=True)
    process.start()
    send.close()
    try:
        while not receive.poll(_POLL_SECONDS):
            if not process.is_alive():
                break
        message = receive.recv() if receive.poll() else None
        process.join()
    except BaseException:
        process.kill()
        process.join()
        raise
    finally:
        receive.close()
    if message is None:
        code = process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            if -code == signal.SIGINT:
                raise KeyboardInterrupt
            raise SrcrError(f"{what} crashed ({name}) in native code; the file it was given may be damaged")
        raise SrcrError(f"{what} ended without a result (exit code {code})")
    status, payload = message
    if status == "ok":
        return payload
    if status == "srcr_error":
        raise SrcrError(payload)
    raise SrcrError(f"{what} failed: {payload}")
