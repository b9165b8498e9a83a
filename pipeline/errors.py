"""Errors a user can act on, and the "did you mean" hint their messages carry. The task runner prints their message
as one line, without a traceback.

With `pipeline.digests`, the ground floor of the package: standard library only, nothing else from `pipeline`, so
that every module may import it.
"""


class TunebuildError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class Unavailable(TunebuildError):
    """Something this machine lacks (a model on the hub, an API key, a server): the recipe cannot be built here."""


def did_you_mean(word: str, known) -> str:
    """' (did you mean X?)' for the known name nearest `word` (difflib, or initials: lr -> learning_rate), or ''."""
    import difflib

    known = [str(k) for k in known]
    initials = [k for k in known if "_" in k and "".join(p[:1] for p in k.split("_")) == word]
    close = initials or difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
