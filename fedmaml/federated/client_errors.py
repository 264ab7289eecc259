"""A ClientApp mod that turns a node's failure into one plain line for the server.

Without it Flower sends the exception's text (in simulation wrapped in a coloured Ray
traceback) to the server. With it the node logs the full traceback locally and replies an
Error whose reason is one line: fedmaml's own message (:class:`FedmamlError` messages name files,
columns and rows, never data values), or only the exception's type for anything else, whose
text could quote the device's data.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR

from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from fedmaml.errors import FedmamlError


def one_line_errors(
    msg: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """Call the handler; on an exception reply :func:`reason` as an Error (logged here in full)."""
    try:
        return call_next(msg, context)
    except Exception as exc:
        log(ERROR, "fedmaml: %s failed", msg.metadata.message_type, exc_info=exc)
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason(exc))
        return Message(error, reply_to=msg)


def reason(exc: BaseException) -> str:
    """One line that is safe to send: fedmaml's message, or the type of another exception."""
    if isinstance(exc, FedmamlError):
        lines = str(exc).strip().splitlines() or [""]
        return f"{type(exc).__name__}: {lines[0]}"[:500]
    return f"{type(exc).__name__} on the node (details in the node's log)"
