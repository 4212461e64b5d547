"""Bad user input: the one exception the CLI turns into one line and exit 2, and the did-you-mean hint."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """Bad user input: one line naming the key (or path) and what is allowed. The CLI exits 2 on it."""


class UnusedKey(ConfigError):
    """A key the user wrote that the resolved config does not use (a chunk size of a kernel the policy does
    not run): refused, since it would give one computation a second trial key. A sweep drops a grid point
    that sets one, and applies its base's only to the points that use it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key  # dotted


def suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
