"""Errors meant for the user: each names what is wrong and what to do about it."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad file, bad field, unsupported model).

    ``field`` names the request field at fault, when there is one, so the API can answer 422
    with it and the UI can point at it.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class Busy(UserError):
    """The generation queue is full: try again later (the API answers 503)."""


class ModelFileError(UserError):
    """A model file that cannot be read or understood."""
