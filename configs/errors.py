"""`FieldError`: a bad value at a boundary, carrying the name of the field it belongs to.

Here, in the package every other one may import (configs imports neither engine nor deployments), so the
engine raises it, the configs validate with it, and the Serve layer reads `.param` for the OpenAI error's
`param` instead of parsing it back out of the message.
"""

from __future__ import annotations


class FieldError(ValueError):
    """A `ValueError` about one field: `param` names it (e.g. "temperature", "prompt_token_ids")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(param, message)
        self.param = param
        self.message = message

    def __str__(self) -> str:
        return self.message
