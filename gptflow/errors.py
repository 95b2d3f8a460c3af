"""The one base class for errors caused by the user's input, settings or environment.

The CLI prints these as a one-line message and exits non-zero; anything else is a bug and keeps its traceback.
"""


class GptflowError(Exception):
    """Bad input, a bad setting, or a missing external service: the message says what, where and what to do."""
