"""What the daemon admits: a submitted spec validated, the paths its task reads confined to
the data roots (symlinks resolved), the directories it writes confined to the checkpoint
root, and nothing the spec shows can never run (launcher.job.bounds: a global batch
larger than the dataset, too many steps, a step's input beyond its simulated devices),
all before anything is queued or reserved.

Every refusal is an `InvalidSpec` naming the field (its `loc`) and what is allowed; the
API answers it with a 422.
"""

from __future__ import annotations

import pathlib
from typing import Any

from pydantic import ValidationError

from autobatch.errors import format_validation_error
from autobatch.step.storage import is_uri
from launcher.errors import InvalidSpec
from launcher.job.bounds import check_spec
from launcher.job.spec import JobSpec
from launcher.job.tasks import BUILTIN, daemon_refuses


class Admission:
    def __init__(
        self,
        *,
        checkpoint_root: pathlib.Path,
        data_roots: tuple[pathlib.Path, ...],
        task_modules: tuple[str, ...],
    ) -> None:
        self.checkpoint_root, self.data_roots = checkpoint_root, data_roots
        self.task_modules = task_modules

    def validate(self, data: Any) -> JobSpec:
        """The spec as sent, validated: its fields, its task, the paths its task reads, and
        what it shows can never run."""
        if not isinstance(data, dict):
            msg = f"a job spec is a mapping of fields, got {type(data).__name__}"
            raise InvalidSpec(msg, [{"loc": [], "msg": msg}])
        try:
            spec = JobSpec.model_validate(data)
        except ValidationError as exc:
            errors = [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"].removeprefix("Value error, ")}
                for e in exc.errors()
            ]
            raise InvalidSpec(f"invalid job spec: {format_validation_error(exc)}", errors) from None
        refused = daemon_refuses(spec.task, self.task_modules)
        if refused:
            _invalid(["task"], refused)
        entry = BUILTIN.get(spec.task)
        for key in entry.path_args if entry else ():
            self.readable(["task_args", key], str(spec.task_args[key]))
        return check_spec(spec)

    def readable(self, loc: list[str], path: str) -> None:
        """A path a task reads: inside a data root (symlinks resolved), or refused."""
        resolved = pathlib.Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.data_roots):
            roots = ", ".join(str(r) for r in self.data_roots)
            _invalid(
                loc,
                f"{path!r} is outside the data roots this daemon reads from ({roots}); put it "
                "there, or start the daemon with --data-root DIR",
            )

    def confined(self, loc: list[str], path: str | None, default: str) -> pathlib.Path | str:
        """A directory the job writes to: inside the checkpoint root, or refused; an object
        store's URI (s3://, gs://: checked by launcher.job.bounds) is no local path to
        confine and is kept as given."""
        if not path:
            return self.checkpoint_root / default
        if is_uri(path):
            return path.rstrip("/")
        p = pathlib.Path(path)
        resolved = (p if p.is_absolute() else self.checkpoint_root / p).resolve()
        if not resolved.is_relative_to(self.checkpoint_root) or resolved == self.checkpoint_root:
            _invalid(
                loc,
                f"{path!r} is outside the checkpoint root {self.checkpoint_root}; "
                "give a relative path inside it",
            )
        return resolved


def _invalid(loc: list[str], msg: str) -> None:
    raise InvalidSpec(f"invalid job spec: {'.'.join(loc)}: {msg}", [{"loc": loc, "msg": msg}])
