"""Errors shared by the CLI's subcommands (a module of its own, so `python -m kvrelay.cli` sees the same class)."""


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""
