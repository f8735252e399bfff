"""The exception types for user errors: the CLI prints their message on one line and exits 2.

Two kinds matter to `--backend auto`:
- BundleError: the bundle itself is wrong (tampered, truncated, inconsistent). That is an error
  whichever backend runs, so auto never falls through to another backend on it.
- BackendUnavailable: this machine cannot run that engine (no GPU, another GPU architecture,
  another TensorRT version, a missing package). Only this lets auto try the next backend.
"""


class UserError(Exception):
    """Bad input from the user (arguments, files, bundles): say what is wrong and what to do."""


class BundleError(UserError):
    """The bundle is corrupt, tampered with or inconsistent: rebuild it."""


class BackendUnavailable(UserError):
    """This machine cannot run this backend's engines (the bundle is fine)."""


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type name where it has none): for one-line errors
    that quote what a library raised."""
    text = str(e)
    return text.splitlines()[0] if text else type(e).__name__
