"""The submit-time storage check: before any device is reserved, the job's checkpoint
directory (and its output directory) is proven writable, a small probe object written,
read back and deleted in bounded time (autobatch.step.storage.probe), so a job whose
storage cannot be reached or written is refused at the door, not after its first
checkpoint interval. `autobatch run` and the daemon's submit both call `check_storage`;
its InvalidSpec names the field and the reason (the CLI prints one line and exits 2,
the daemon answers a 422).
"""

from __future__ import annotations

import os

from autobatch.errors import StorageError
from autobatch.step.storage import PROBE_TIMEOUT_S, probe
from launcher.errors import InvalidSpec


def check_storage(
    checkpoint_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> None:
    """InvalidSpec naming `checkpoint.dir` or `output_dir` when either cannot be written."""
    fields = [(["checkpoint", "dir"], checkpoint_dir)]
    if output_dir is not None:
        fields.append((["output_dir"], output_dir))
    for loc, where in fields:
        try:
            probe(where, timeout_s)
        except StorageError as exc:
            msg = str(exc)
            raise InvalidSpec(
                f"invalid job spec: {'.'.join(loc)}: {msg}", [{"loc": loc, "msg": msg}]
            ) from None
