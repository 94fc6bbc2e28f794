"""A wrapper that keeps an API key out of reprs, tracebacks, logs and pickled Ray task arguments."""
from __future__ import annotations

import os

from pipeline.errors import UserError


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self):
        # Pickling would copy the key into Ray's object store and task specs; pass the env var name instead.
        raise TypeError("a Secret is not serialisable; pass the environment variable name and read it there")


class MissingSecretError(UserError, RuntimeError):
    """The environment variable that should hold an API key is unset or empty."""


def secret_from_env(variable: str, purpose: str) -> Secret:
    value = os.environ.get(variable)
    if not value:
        raise MissingSecretError(f"the {purpose} API key is missing: set the environment variable ${variable} "
                           "(its name comes from the config's api_key_env)")
    return Secret(value)
