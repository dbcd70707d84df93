"""Exceptions raised by pactors. All of them carry plain data only."""

from __future__ import annotations

from typing import Any


class PactorsError(Exception):
    """Base class of every pactors error."""


class ChannelClosed(PactorsError):
    """The inbox or channel was closed by its owner."""


class NoSenders(PactorsError):
    """Every sender of an inbox is gone; ``receive()`` would wait forever.

    Send ``inbox.address`` to somebody before receiving on it.
    """


class MessageError(PactorsError, ValueError):
    """A message cannot be encoded, or one received was malformed or too large."""


class ActorError(PactorsError):
    """An exception escaped a subprocess actor's ``main``.

    Only plain data crosses the process boundary: the exception's type name,
    its message and the formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text


class InitError(PactorsError):
    """The init script of a subprocess actor failed.

    ``kind`` is ``"call"`` (a ``C.*`` call failed while ``errexit`` was set),
    ``"syntax"`` or ``"exception"``. ``function``, ``arguments``, ``errno``,
    ``errno_name`` and ``strerror`` describe a failed call; ``line`` is the
    script line, when known.
    """

    FIELDS = ("kind", "message", "function", "arguments", "errno", "errno_name",
              "strerror", "line")

    def __init__(self, **fields: Any) -> None:
        self.kind: str = str(fields.get("kind") or "exception")
        self.message: str = str(fields.get("message") or "")
        self.function: str | None = fields.get("function")
        self.arguments: str | None = fields.get("arguments")
        self.errno: int | None = fields.get("errno")
        self.errno_name: str | None = fields.get("errno_name")
        self.strerror: str | None = fields.get("strerror")
        self.line: int | None = fields.get("line")
        super().__init__(self.describe())

    def describe(self) -> str:
        where = f"init script line {self.line}" if self.line else "init script"
        if self.kind == "call":
            return (f"{where}: C.{self.function}({self.arguments or ''}) failed: "
                    f"{self.errno_name} ({self.strerror})")
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}
