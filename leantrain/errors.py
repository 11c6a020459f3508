"""User-facing errors.

Anything a user can cause (a config key, a data file, a checkpoint) raises one of these with a
one-paragraph message that names what is wrong and what is allowed. The command line turns them
into that message on stderr and exit code 2, with no traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: config, data, tokenizer, checkpoint. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key has an unknown name, a wrong type, a bad value, or contradicts another key."""


class DataError(UserError):
    """A data or tokenizer file is missing, unreadable, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, or belongs to another model or recipe."""
