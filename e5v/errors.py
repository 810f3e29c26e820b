"""The project's exceptions: every error raised on purpose derives from :class:`E5VError`.

``except E5VError`` catches a mistake the user can fix (the command-line tools print it as one line,
:mod:`e5v.cli.errors`); each class also keeps its builtin base, so ``except ValueError`` /
``except FileNotFoundError`` around older code still works. The same condition raises the same class
in training and in evaluation:

* :class:`ConfigError`: a config value that is missing, out of range or inconsistent;
* :class:`DataError`: a data file that exists but is unusable (columns, encoding, rows, images);
* :class:`MissingDataError`: data that is not where the config says (also a ``DataError``).

Other modules define narrower classes on these (``BadImageError``, ``PromptConfigError`` ...).
"""

from __future__ import annotations


class E5VError(Exception):
    """Base of every error this project raises on purpose (a mistake the user can fix, a refused state)."""


class ConfigError(E5VError, ValueError):
    """A config value is missing, out of range or inconsistent; the message names the key and the fix."""


class DataError(E5VError, ValueError):
    """A data file exists but cannot be used as it is; the message names the file (and row)."""


class MissingDataError(DataError, FileNotFoundError):
    """Data is not where the config says; the message says how to prepare it."""


__all__ = ["ConfigError", "DataError", "E5VError", "MissingDataError"]
