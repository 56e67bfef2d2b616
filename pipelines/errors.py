"""Errors meant for the user: the CLI prints their message as one line."""


class UserError(Exception):
    """Bad input, a missing resource or an unreachable service, described in one line that names the culprit."""
