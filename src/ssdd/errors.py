"""One exception type for user mistakes, so the CLI can print them as one line."""


class UserError(Exception):
    """Bad input from the user (file, option, config). The CLI prints it and exits 2."""
