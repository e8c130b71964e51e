"""The two kinds of error faspx reports to a user: fix-your-command (exit 2) and failed (exit 1)."""


class FaspxError(Exception):
    """A failure the user can act on; the CLI prints its message as one line and exits 1."""

    exit_code = 1


class UsageError(FaspxError):
    """Bad input on the command line (or in the API call); the CLI exits 2."""

    exit_code = 2
