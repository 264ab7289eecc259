"""Subcommands of the ``fedmaml`` CLI, one module each."""
