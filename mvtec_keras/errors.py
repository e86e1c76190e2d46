"""One exception type for bad user input.

Scripts catch :class:`InputError`, print its one-line message and exit with
code 2; everything else is a bug and keeps its traceback.
"""

EXIT_BAD_INPUT = 2


class InputError(ValueError):
    """Bad input from the user: missing folder, corrupt image, wrong flag...

    The message is a single line that names the offending file or flag.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
