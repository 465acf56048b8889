"""The one exception type for mistakes a user can make; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    pass
