"""The one exception type the launcher turns into `exit 2` with a one-line message."""


class UsageError(Exception):
    """A problem the user can fix: a bad command line, config value or missing data.

    The launcher prints `error: <message>` on stderr, without a traceback, and exits 2.
    """


class DataNotFoundError(UsageError):
    """The dataset's files are not where the config says they are."""


class NonFiniteError(Exception):
    """The loss or the gradient stopped being finite; the last good checkpoint is kept."""


class SaveError(Exception):
    """A checkpoint could not be written (a full disk); the previous one is intact. Exit 1."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved and the run can be resumed."""
