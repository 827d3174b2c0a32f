"""One-line descriptions of errors, for the ``seft`` command's messages."""

from __future__ import annotations

VAGUE = "An error occurred while generating the dataset"  # datasets wraps the parser's error in this one


def one_line(error: BaseException, limit: int = 1000) -> str:
    """``error``'s message on one line (its cause's, when the message itself says nothing specific)."""
    while error.__cause__ is not None and VAGUE in str(error):
        error = error.__cause__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
