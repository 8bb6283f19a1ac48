"""Every error the launcher and the daemon raise on purpose (the library's are in
`autobatch.errors`, whose root they share).

    AutobatchError                          (autobatch.errors)
    ├── LaunchError                         the launcher could not start, run or keep a job
    │   └── JobCancelled                    the job's stop event was set; all cleaned up
    ├── SpecError(ValueError)               a job spec is invalid (each bad field named)
    │   └── InvalidSpec                     a submitted spec, with one {loc, msg} per problem
    ├── TaskError(ValueError)               a job's task is unknown, or its arguments wrong
    ├── BodyError(ValueError)               a request body the API refuses (status, loc)
    ├── StoreError                          a job record operation is impossible
    │   ├── UnknownJob(KeyError)            no job with that id
    │   ├── TransitionError                 a state change the job's states do not allow
    │   └── JobStateError                   a request that does not fit the job's state
    ├── ClientError                         a request to the daemon failed (the CLI's)
    │   └── DaemonUnreachable               no daemon answered at that address
    ├── HeadError                           the daemon's Ray head cannot start or answer
    └── ServeError                          the daemon cannot start with these settings

Messages name the field or value and what is allowed. A third-party error is mapped to
one of these where it crosses into the project (`raise ... from exc` where the cause
helps the user).
"""

from __future__ import annotations

from typing import Any

from autobatch.errors import AutobatchError, LaunchError

__all__ = [
    "AutobatchError",
    "BodyError",
    "ClientError",
    "DaemonUnreachable",
    "HeadError",
    "InvalidSpec",
    "JobCancelled",
    "JobStateError",
    "LaunchError",
    "ServeError",
    "SpecError",
    "StoreError",
    "TaskError",
    "TransitionError",
    "UnknownJob",
]


class JobCancelled(LaunchError):
    """The job's `stop` event was set (the job was cancelled); everything was cleaned up."""


class SpecError(AutobatchError, ValueError):
    """A job spec is invalid: the message names each bad field and what is allowed."""


class InvalidSpec(SpecError):
    """A submitted spec is invalid; `errors` holds one {loc, msg} per problem."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message, errors)
        self.errors = errors

    def __str__(self) -> str:
        return str(self.args[0])


class TaskError(AutobatchError, ValueError):
    """A job's task cannot be found, its arguments are invalid, or it did not build."""


class BodyError(AutobatchError, ValueError):
    """A request body the API refuses; `loc` is the path to the problem, `status` the answer."""

    def __init__(self, message: str, loc: tuple[str, ...] = ("body",), status: int = 422) -> None:
        super().__init__(message)
        self.loc, self.status = list(loc), status

    def __reduce__(self) -> tuple:  # from a parser process back to the daemon, whole
        return (type(self), (str(self), tuple(self.loc), self.status))


class StoreError(AutobatchError):
    """A job record operation is impossible (unknown id, transition not allowed)."""


class UnknownJob(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TransitionError(StoreError):
    """A state change the job's states do not allow."""


class JobStateError(StoreError):
    """The request does not fit the job's state (e.g. cancelling a finished job)."""


class ClientError(AutobatchError):
    """A request to the daemon failed; the message says why in one line."""


class DaemonUnreachable(ClientError):
    """No daemon answered at the client's address (not started, or restarting)."""


class HeadError(AutobatchError):
    """The daemon's Ray head cannot be started or reached."""


class ServeError(AutobatchError):
    """The daemon cannot start with these settings."""
