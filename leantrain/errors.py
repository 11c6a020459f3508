"""User-facing errors.

Anything a user can cause (a config key, a data file, a checkpoint) raises one of these with a
one-paragraph message that names what is wrong and what is allowed. The command line turns them
into that message on stderr and the error's exit code, with no traceback:

    2  bad input (UserError and its subclasses): nothing was trained, no saved file was changed
    3  the training diverged (TrainingDiverged): too many NaN/Inf steps in a row, or NaN/Inf weights
"""

from __future__ import annotations


class LeantrainError(Exception):
    """An error explained to the user in one paragraph: printed without a traceback, exit code ``exit_code``."""

    exit_code = 1


class UserError(LeantrainError):
    """Bad input from the user: config, data, tokenizer, checkpoint. Exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key has an unknown name, a wrong type, a bad value, or contradicts another key."""


class DataError(UserError):
    """A data or tokenizer file is missing, unreadable, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete, or belongs to another model or recipe."""


class TrainingDiverged(LeantrainError):
    """The loss or gradient norm was NaN/Inf for training.max_nonfinite_steps steps in a row, or the weights hold
    NaN/Inf when a checkpoint is due (none is written from them). Exit code 3."""

    exit_code = 3


class StorageError(UserError):
    """A file of the run could not be written (disk full, a file too large, permission lost). Exit code 2: what was
    saved before (earlier checkpoints, metrics.jsonl up to its last line) is complete and loadable."""


def storage_error(what: str, path: object, error: BaseException) -> StorageError:
    """One paragraph for a failed write: what, where, the system's reason, and what was kept."""
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return StorageError(
        f"Writing {what} ({path}) failed: {reason}. The run stopped here; what it saved before "
        f"(earlier checkpoints, metrics.jsonl up to its last complete line) is intact. Free space or "
        f"fix the folder's permissions, then run the same command again (with checkpoint.enable it "
        f"resumes from the latest complete checkpoint)."
    )
