"""Errors a user can act on. The task runner prints their message as one line, without a traceback."""


class TunebuildError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Unavailable(TunebuildError):
    """Something this machine lacks (a model on the hub, an API key, a server): the recipe cannot be built here."""
