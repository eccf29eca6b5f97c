"""The one exception the data stage raises for problems a user can fix."""

from __future__ import annotations


class DatasetError(Exception):
    """A dataset cannot be prepared or loaded; the message says what is wrong and how to fix it."""
