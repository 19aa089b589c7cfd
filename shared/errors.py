"""The error class users see: what went wrong and what to do next."""
from __future__ import annotations


class AnemllError(Exception):
    """An error a user can act on.

    ``code`` is stable (used on the wire and in error.json), ``hint`` says what to
    do next, ``stage`` names the conversion stage or component that failed.
    """

    code = "error"

    def __init__(self, message: str, hint: str = "", *, stage: str = "", code: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.stage = stage
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message}\n  -> {self.hint}" if self.hint else self.message

    def to_dict(self) -> dict:
        return {"code": self.code, "stage": self.stage, "message": self.message, "hint": self.hint}


class BadInput(AnemllError):
    """The model folder or an option cannot work."""

    code = "bad_input"
