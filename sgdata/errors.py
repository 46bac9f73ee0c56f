"""The one exception type that entry points turn into a one-sentence message and a non-zero exit."""


class UserError(Exception):
    """A fatal problem with the user's input (missing root, bad option, corrupt checkpoint...).

    The message is one sentence that says what is wrong and, where it helps, what to do.
    The CLIs print it without a traceback and exit with status 2.
    """
