"""Where a job's files live: a local path (every node must share it), or an object store's
URI (`s3://bucket/prefix`, `gs://bucket/prefix`), through fsspec.

    location("s3://b/ckpt")      the location as the checkpoint code passes it on: a str
                                 URI for an object store, a Path for a local path (also
                                 `file://...`); refuses credentials in the URI
    Storage(location)            its file system and the few operations checkpoints need:
                                 join, names, exists, remove, read/write a whole object,
                                 upload a local directory
    Storage.probe(timeout_s)     write, read back and delete a small object, in bounded time

Local paths keep their atomic semantics (temporary + fsync + rename,
`autobatch.step.atomic`). On an object store an object is written whole by one put, so
each object is atomic; a directory of objects (a sharded checkpoint) is not, and its
completeness is a marker object written last (launcher.job.checkpoint).

Credentials and endpoints come only from the environment, as each cloud's own tools read
them (botocore: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_PROFILE, AWS_ENDPOINT_URL for
an S3-compatible store; gcsfs: GOOGLE_APPLICATION_CREDENTIALS). A URI that carries a
secret is refused, and no message here repeats a URI's user part or query.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autobatch.errors import StorageError
from autobatch.step.atomic import STORAGE_ERRNOS, storage_error, write_atomically

OBJECT_SCHEMES = ("s3", "gs", "gcs")  # what fsspec reaches with s3fs / gcsfs installed
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PROBE_TIMEOUT_S = 15.0  # the whole submit-time check, whatever the store's own retries
# Environment variables the object stores' clients read; forwarded to a job's ranks by name.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
)


def is_uri(value: str | os.PathLike) -> bool:
    """Whether `value` names an object store (not a local path, nor `file://`)."""
    m = _SCHEME.match(str(value)) if isinstance(value, str) else None
    return m is not None and m.group(1).lower() != "file"


def uri_problem(value: str) -> str | None:
    """Why `value` cannot be a storage location (None: it can). Never repeats the value:
    it may hold a secret."""
    m = _SCHEME.match(value)
    if m is None:
        return None  # a local path
    scheme = m.group(1).lower()
    parts = urlsplit(value)
    if "@" in parts.netloc or parts.password is not None:
        return (
            "a storage URI must not carry credentials (user:secret@...): give them through "
            "the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE; "
            "GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if parts.query or parts.fragment:
        return (
            "a storage URI takes no query string or fragment (it may carry a secret, e.g. a "
            "signature): give credentials through the environment"
        )
    if scheme == "file":
        return None if parts.netloc in ("", "localhost") else "a file:// URI names no host"
    if scheme not in OBJECT_SCHEMES:
        return f"storage scheme {scheme}:// is not supported: use a local path, s3:// or gs://"
    if not parts.netloc:
        return f"a {scheme}:// URI names a bucket: {scheme}://BUCKET/PREFIX"
    return None


def location(value: str | os.PathLike) -> str | Path:
    """`value` as the checkpoint code passes it: a str URI, or a Path for a local one."""
    if isinstance(value, Path):
        return value
    text = os.fspath(value)
    problem = uri_problem(text)
    if problem is not None:
        raise ValueError(problem)
    if text.lower().startswith("file://"):
        return Path(urlsplit(text).path)
    return text.rstrip("/") if is_uri(text) else Path(text)


def join(base: str | os.PathLike, *names: str) -> str | Path:
    """`base`/`names` in `base`'s kind: a URI string, or a Path."""
    loc = location(base)
    if isinstance(loc, Path):
        return loc.joinpath(*names)
    return "/".join([loc, *names])


def basename(path: str | os.PathLike) -> str:
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def storage_options(protocol: str, *, timeout_s: float | None = None) -> dict[str, Any]:
    """What fsspec's file system of `protocol` is built with: a fresh instance (its
    credentials and endpoint read from the environment now), no stale listings (other
    processes write the same prefix), and for the submit-time check, bounded waits."""
    options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
    if protocol == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint  # botocore reads it too; explicit is certain
        if timeout_s is not None:
            wait = max(1, int(timeout_s / 3))
            options["config_kwargs"] = {
                "connect_timeout": wait,
                "read_timeout": wait,
                "retries": {"max_attempts": 1, "mode": "standard"},
            }
    return options


# One file system per protocol, endpoint and credentials (as the environment gives them now):
# a client's session is costly to build, and a new environment must not reuse an old one.
_CLIENTS: dict[tuple, Any] = {}


def _client_key(protocol: str, options: dict[str, Any]) -> tuple:
    import hashlib

    env = tuple(os.environ.get(k, "") for k in STORAGE_ENV)
    return (protocol, repr(sorted(options.items())), hashlib.sha256(repr(env).encode()).hexdigest())


class Storage:
    """A location's file system and the operations the checkpoint code needs. Names are
    relative to the location (`a/b`); a missing location lists as empty."""

    def __init__(self, where: str | os.PathLike, *, timeout_s: float | None = None) -> None:
        self.location = location(where)
        self.local = isinstance(self.location, Path)
        if self.local:
            self.fs, self.root = None, str(self.location)
        else:
            import fsspec

            protocol = urlsplit(self.location).scheme.lower()
            try:
                cls = fsspec.get_filesystem_class(protocol)
            except (ImportError, ValueError) as exc:
                package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(protocol, protocol)
                raise StorageError(
                    f"{self.location}: {protocol}:// needs the package {package} "
                    f"(pip install {package})",
                    str(self.location),
                ) from exc
            opts = storage_options(protocol, timeout_s=timeout_s)
            self.options = opts
            key = _client_key(protocol, opts)
            self.fs = _CLIENTS.get(key) if timeout_s is None else None
            if self.fs is None:
                self.fs = cls(**opts)
                if timeout_s is not None and hasattr(self.fs, "retries"):
                    self.fs.retries = 1  # s3fs's own retries, on top of botocore's
                else:
                    _CLIENTS[key] = self.fs
            self.root = cls._strip_protocol(self.location)

    def __repr__(self) -> str:
        return f"Storage({str(self.location)!r})"

    # -- names ----------------------------------------------------------------
    def join(self, *names: str) -> str | Path:
        """The location of `names` under this one (what a reader is handed)."""
        return join(self.location, *names)

    def _path(self, name: str = "") -> str:
        return f"{self.root}/{name}" if name else self.root

    def names(self, under: str = "") -> list[str]:
        """The names directly under `under` (files and directories), sorted."""
        if self.local:
            d = Path(self.root, under)
            return sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        try:
            found = self.fs.ls(self._path(under), detail=False)
        except FileNotFoundError:
            return []
        return sorted({basename(p) for p in found} - {""})

    def exists(self, name: str) -> bool:
        if self.local:
            return Path(self.root, name).exists()
        return self.fs.exists(self._path(name))

    def is_dir(self, name: str) -> bool:
        if self.local:
            return Path(self.root, name).is_dir()
        return self.fs.isdir(self._path(name))

    # -- whole objects -----------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        if self.local:
            return Path(self.root, name).read_bytes()
        return self.fs.cat_file(self._path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Writes `name` whole: a local file atomically (temporary, fsync, rename), an
        object by one put. A storage fault raises StorageError."""
        if self.local:
            path = Path(self.root, name)
            self._guard(lambda: path.parent.mkdir(parents=True, exist_ok=True))
            write_atomically(path, lambda f: f.write(data))
            return
        self._guard(lambda: self.fs.pipe_file(self._path(name), data))

    def remove(self, name: str) -> None:
        """Removes `name` (a whole directory or prefix), if there."""
        if self.local:
            path = Path(self.root, name)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(name), recursive=True)

    def upload(self, local_dir: str | os.PathLike, name: str = "") -> None:
        """Copies the files of `local_dir` under `name` (a local location: copied over)."""
        if self.local:
            target = Path(self.root, name)
            self._guard(lambda: shutil.copytree(local_dir, target, dirs_exist_ok=True))
            return
        self._guard(
            lambda: self.fs.put(
                os.fspath(local_dir).rstrip("/") + "/", self._path(name) + "/", recursive=True
            )
        )

    def _guard(self, write: Any) -> None:
        try:
            write()
        except BaseException as exc:
            fault = self.fault(exc)
            if fault is None:
                raise
            raise fault from exc

    def fault(self, exc: BaseException) -> StorageError | None:
        """The storage fault behind `exc` raised writing here (None: no storage fault)."""
        if self.local:
            return storage_error(self.root, exc)
        why = object_store_fault(exc)
        if why is None:
            return None
        return StorageError(f"{self.location}: {why}", str(self.location))

    # -- the submit-time check ---------------------------------------------------------
    def probe(self) -> None:
        """Write, read back and delete a small object here (a local path: in the nearest
        existing folder, creating nothing); StorageError saying what is wrong."""
        name = f".autobatch-probe-{uuid.uuid4().hex}"
        data = b"autobatch storage probe\n"
        if self.local:
            _probe_local(Path(self.root), name, data)
            return
        try:
            self.fs.pipe_file(self._path(name), data)
            back = self.fs.cat_file(self._path(name))
            self.fs.rm_file(self._path(name))
        except BaseException as exc:
            why = object_store_fault(exc) or f"{type(exc).__name__}: {_first_line(exc)}"
            raise StorageError(
                f"cannot write to {self.location}: {why}", str(self.location)
            ) from None
        if back != data:
            raise StorageError(
                f"cannot write to {self.location}: a probe object read back differently",
                str(self.location),
            )


def probe(where: str | os.PathLike, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """`Storage(where).probe()` within `timeout_s` (an object store's waits and retries
    bounded too); StorageError naming what is wrong."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="storage-probe")
    try:
        future = pool.submit(lambda: Storage(where, timeout_s=timeout_s).probe())
        try:
            future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise StorageError(
                f"cannot write to {location(where)}: no answer within {timeout_s:g} s "
                "(an unreachable endpoint?)",
                str(where),
            ) from None
    finally:
        pool.shutdown(wait=False)


def _probe_local(directory: Path, name: str, data: bytes) -> None:
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise StorageError(
            f"cannot write to {directory}: {existing} is not a folder", str(directory)
        )
    path = existing / name
    try:
        path.write_bytes(data)
        ok = path.read_bytes() == data
    except OSError as exc:
        code = exc.errno if exc.errno in STORAGE_ERRNOS else None
        fault = storage_error(existing, exc)
        why = str(fault) if fault is not None else f"{exc.strerror or exc}"
        if code is None and fault is None:
            why = f"{existing}: {why}"
        raise StorageError(f"cannot write to {directory}: {why}", str(directory)) from None
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if not ok:
        raise StorageError(
            f"cannot write to {directory}: a probe file read back differently", str(directory)
        )


def object_store_fault(exc: BaseException) -> str | None:
    """What an object store's error says is missing (no bucket, access denied, no
    credentials, unreachable), or None when `exc` is no storage fault."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        name = type(e).__name__
        text = _first_line(e)
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return (
                "no credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                "AWS_PROFILE; for gs://, GOOGLE_APPLICATION_CREDENTIALS)"
            )
        if name in (
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ConnectionClosedError",
        ) or isinstance(e, (ConnectionError, TimeoutError)):
            return "its endpoint is unreachable"
        if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
            return "no such bucket"
        if isinstance(e, PermissionError) or any(
            w in text
            for w in (
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "Forbidden",
                "403",
            )
        ):
            return "access denied (check the credentials and the bucket's policy)"
        if isinstance(e, FileNotFoundError):
            return "no such bucket"
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return "no space left"
        todo += [e.__cause__, e.__context__]
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
