"""Errors a user can cause. The CLI turns them into one line on stderr and exit code 2."""


class UserError(Exception):
    """A mistake in what the user asked for (bad model name, bad file, bad number)."""
