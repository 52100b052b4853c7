"""The one base class of the errors a user can fix.

`esft` (pipeline/cli.py:main) prints an `EsftError` as one line `esft: error: ...` and exits 2;
every other exception keeps its traceback. Each module's own error (DataError, ConfigError,
AdapterError, ...) derives from `EsftError`, and a module without one raises `EsftError` itself.
Third-party errors caused by user input (a malformed JSON file, an unreadable safetensors file, a
model that cannot be found) are re-raised as one of them, with the fix in the message.

`EsftError` keeps `ValueError` as its base so callers that catch `ValueError` (and tests that
expect it) still work. The CLI does not catch plain `ValueError`: numpy, torch and the standard
library raise it for programming errors too, and those must show their traceback.
"""

from __future__ import annotations


class EsftError(ValueError):
    """An input or setting the user can fix; the CLI prints it as one line."""
