"""What a client's input can get wrong, as one family of exceptions: each carries the HTTP status the client gets (a
4xx) and a message naming the input, the row or the element at fault; every runtime turns them into its own answer."""

from __future__ import annotations


class InputError(Exception):
    """Bad client input: an HTTP status and a message that says what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


class SignatureError(InputError, ValueError):
    """An input the signature does not allow; the message names the input and, where one is at fault, the element."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(status, message)
