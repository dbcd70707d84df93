"""Run a subprocess actor's init script: the Python port of Emilua's Lua init script.

The script is Python source executed with a fixed set of globals (see
``_syscalls.build_globals``): ``C`` (syscall wrappers and constants), ``arg``,
``mode``, ``errexit``, ``send_with_fd``, ``receive_with_fd``, ``write_all`` and
``set_no_new_privs``, plus a small set of builtins. The restriction keeps the
script to that vocabulary; it is not a security boundary.
"""

from __future__ import annotations

from types import TracebackType

from pactors._errors import InitError
from pactors.subprocess_init._syscalls import (
    SCRIPT_FILENAME,
    CallFailed,
    ScriptState,
    build_globals,
    empty_failure,
    errno_name,
)

__all__ = ["InitScriptFailure", "run_init_script"]


class InitScriptFailure(Exception):
    """The init script failed. ``fields`` has exactly the keys of ``InitError.FIELDS``."""

    def __init__(self, fields: dict[str, object]) -> None:
        self.fields: dict[str, object] = {name: fields.get(name) for name in InitError.FIELDS}
        super().__init__(self.fields.get("message") or self.fields.get("kind"))


def _innermost_script_line(tb: TracebackType | None) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == SCRIPT_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _syntax_failure(exc: SyntaxError | ValueError) -> dict[str, object]:
    failure = empty_failure()
    failure["kind"] = "syntax"
    if isinstance(exc, SyntaxError):
        failure["message"] = f"{type(exc).__name__}: {exc.msg}"
        failure["line"] = exc.lineno
    else:
        # compile() rejects NUL bytes with ValueError on 3.11.
        failure["message"] = f"{type(exc).__name__}: {exc}"
    return failure


def _exception_failure(exc: Exception) -> dict[str, object]:
    failure = empty_failure()
    text = str(exc)
    name = type(exc).__name__
    failure["message"] = f"{name}: {text}" if text else name
    failure["line"] = _innermost_script_line(exc.__traceback__)
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        failure.update(errno=exc.errno, errno_name=errno_name(exc.errno),
                       strerror=exc.strerror)
    return failure


def run_init_script(script: bytearray, arg: int | None) -> None:
    """Runs the init script in this process; raises InitScriptFailure.

    Afterwards zeroes ``script`` in place and drops the namespace. File
    descriptors the script opened stay open: the caller closes every fd but
    0-2 and its inbox afterwards.
    """
    state = ScriptState()
    failure: dict[str, object] | None = None
    try:
        g = build_globals(state, arg)
        try:
            code = compile(script, SCRIPT_FILENAME, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            failure = _syntax_failure(exc)
        else:
            try:
                exec(code, g)
            except CallFailed:
                pass
            except Exception as exc:
                failure = _exception_failure(exc)
            finally:
                del code
        # The first errexit failure wins, even if the script caught it.
        if state.failure is not None:
            failure = state.failure
    finally:
        script[:] = bytes(len(script))
        state.globals.clear()
        state.failure = None
    if failure is not None:
        raise InitScriptFailure(failure)
