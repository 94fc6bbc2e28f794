"""The one base of the errors a user can act on.

`tapir` prints such an error's message alone (it names the file, row, field or setting to fix) and exits with 2;
any other exception is a bug of this project or of a library and keeps its traceback. Each subclass keeps the
built-in base it had (ValueError, RuntimeError), so the code that catches those still does.
"""


class UserError(Exception):
    """Bad input, settings, data or surroundings, said so that the person can fix it."""
