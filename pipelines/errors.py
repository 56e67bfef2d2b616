"""Errors meant for the user: the CLI prints their message as one line."""


class UserError(Exception):
    """Bad input, a missing resource or an unreachable service, described in one line that names the culprit."""


def flag_error(exc) -> UserError:
    """A ``ddpm.settings.SettingError`` as the CLI says it: the field named as its flag (``--guidance-scale``)."""
    return UserError(f"--{exc.field.replace('_', '-')}: {exc.reason}")
