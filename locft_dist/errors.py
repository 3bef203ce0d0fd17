"""User-facing error types.

Everything a user can cause (bad config, bad edit file, wrong location spec, a delta for another base)
raises a subclass of ``LocftError`` with a message that names the file, record and field involved.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LocftError(ValueError):
    """Base class of errors caused by user input."""


class ConfigError(LocftError):
    """An invalid configuration key or value."""


class EditDataError(LocftError):
    """An edit file that cannot be read or holds an invalid record."""


class EncodingError(LocftError):
    """An edit that cannot be tokenized into a training example (e.g. target longer than max_length)."""


class LocateError(LocftError):
    """A layer/module spec that does not resolve to parameters of the model."""


class DeltaError(LocftError):
    """A delta file that is malformed or does not belong to the given base model."""


class RunDirBusyError(LocftError):
    """The output directory is locked by another live run."""


class StorageError(LocftError):
    """An output could not be written (disk full, file too large, read-only); earlier outputs are kept."""


class RunDirError(LocftError):
    """A run directory without the outputs a command needs (e.g. ``locft report`` on an empty directory)."""


class ModelImportError(LocftError):
    """A model file that cannot be imported (not a GGUF file, a missing package, an existing output)."""
