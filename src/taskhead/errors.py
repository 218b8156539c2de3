"""The one exception type a user ever sees from taskhead."""


class TaskheadError(Exception):
    """Bad input from the user: a file, a line, a field or an option.

    The CLI prints the message alone (no traceback) and exits with status 2. The message names what is wrong and
    where: ``path:line: field 'text' is missing``.
    """
