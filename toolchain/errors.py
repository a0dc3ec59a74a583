"""Exceptions that map to the CLI's exit-code contract.

Exit 0: success. Exit 1: a check failed (budget, parity bound). Exit 2: bad input
(unknown model, malformed file, bad recipe). The CLI prints the message as one line.
"""


class ToolchainError(Exception):
    """Bad input: the message names the culprit. Exit code 2."""

    exit_code = 2


class CheckFailed(ToolchainError):
    """A budget or parity bound did not hold. Exit code 1."""

    exit_code = 1
