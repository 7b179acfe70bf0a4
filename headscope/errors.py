"""User-facing errors: one line that names the problem and the fix."""


class HeadscopeError(ValueError):
    """A mistake in what the user asked for (bad word, bad file, bad option).

    The CLI prints its message on one line and exits with code 2; no traceback.
    """
