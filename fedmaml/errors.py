"""The one exception type fedmaml raises for bad input.

Every message names the problem and the fix, so that the CLI can print it as one line
instead of a traceback from deep inside torch or Flower.
"""

from __future__ import annotations


class FedmamlError(ValueError):
    """Bad input or configuration: the message says what is wrong and how to fix it."""


class NonFiniteError(FedmamlError):
    """A loss or gradient became NaN or infinite; nothing was updated."""
