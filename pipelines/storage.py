"""Object-store URIs shared by every stage: ``s3://bucket/prefix`` or a local path, behind one pyarrow filesystem.

Every stage names its inputs and outputs by URI, so the same command runs against AWS S3, any S3-compatible store
(MinIO, Ceph, R2, moto) or a local folder. The endpoint comes from ``--endpoint-url`` or ``AWS_ENDPOINT_URL``
(``AWS_ENDPOINT_URL_S3`` first, as in the AWS SDKs); credentials come from the AWS SDK's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, profiles, instance roles), so they are never
passed around, printed or pickled by this module.

Consistency model: one object is written atomically (an S3 PUT, or a rename of a temporary file on a local disk), so a
reader sees the old object or the new one, never a part. Outputs made of many objects commit by writing one small
object last (a ``manifest.json`` that lists the rest), and readers trust only what such an object lists.

Every failure of the store (missing bucket, unreachable endpoint, refused credentials) becomes a
:class:`~pipelines.errors.UserError` whose one-line message starts with the URI.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines.errors import UserError

# The AWS SDK's error codes, as pyarrow quotes them in its messages, and what each means to the user.
_AWS_ERRORS = {
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "NETWORK_CONNECTION": "cannot connect to the S3 endpoint {endpoint}",
    "INVALID_ACCESS_KEY_ID": "the access key was refused: check AWS_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH": "the signature was refused: check AWS_SECRET_ACCESS_KEY",
    "ACCESS_DENIED": "access denied: check the credentials and the bucket's permissions",
    "HTTP status 403": "access denied: check the credentials and the bucket's permissions",
}


@dataclass(frozen=True)
class FileEntry:
    """One object found under a listed URI."""

    key: str  # path relative to the listed URI, '/'-separated
    size: int  # bytes
    mtime: float | None  # seconds since the epoch, where the store reports it


def join(uri: str, *parts: str) -> str:
    """``join("s3://b/out", "data-1", "x.parquet") == "s3://b/out/data-1/x.parquet"`` (also for local paths)."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))])


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """The S3 endpoint to use: the flag's value, else the AWS SDKs' environment variables, else AWS itself (None)."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _endpoint_parts(endpoint_url: str) -> tuple[str, str]:
    """``"http://127.0.0.1:9000"`` -> ``("http", "127.0.0.1:9000")``; a bare host means https; user info is dropped."""
    parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"{endpoint_url}: not an http(s) endpoint URL")
    host = parsed.hostname if parsed.port is None else f"{parsed.hostname}:{parsed.port}"
    return parsed.scheme, host


def filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds ``uri`` and the path to pass to it.

    ``s3://bucket/prefix`` -> (S3FileSystem, ``"bucket/prefix"``); a local path or ``file://`` URI ->
    (LocalFileSystem, absolute path). Constructing the filesystem makes no request; errors surface on first use.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        scheme, rest = "", uri
    if scheme == "s3":
        path = rest.strip("/")
        if not path:
            raise UserError(f"{uri}: no bucket in the URI; use s3://bucket/prefix")
        options: dict[str, Any] = {}
        endpoint = resolve_endpoint(endpoint_url)
        if endpoint:
            options["scheme"], options["endpoint_override"] = _endpoint_parts(endpoint)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options), path
    if scheme in ("", "file"):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(rest))
    raise UserError(f"{uri}: unsupported URI scheme {scheme!r}; use s3://bucket/prefix or a local path")


@contextlib.contextmanager
def user_errors(uri: str, endpoint_url: str | None = None) -> Iterator[None]:
    """Re-raise the store's errors inside the block as one-line UserErrors that name ``uri``.

    Also the store's errors raised in Ray tasks (a Ray Data read or write), which reach the driver wrapped.
    """
    try:
        yield
    except UserError:
        raise
    except FileNotFoundError as exc:
        reason = "the bucket does not exist" if _bucket_missing(uri, endpoint_url) else "not found"
        raise UserError(f"{uri}: {reason}") from exc
    except Exception as exc:
        text = str(exc)
        # A Ray task's failure comes back as a RayTaskError, not an OSError: its text quotes the store's error (and a
        # traceback). Only the store's errors are translated; anything else is not this module's to explain.
        reason = explain(text, endpoint_url)
        if reason is None and not isinstance(exc, OSError):
            raise
        if reason is None:
            reason = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise UserError(f"{uri}: {reason}") from exc


def explain(message: str, endpoint_url: str | None = None) -> str | None:
    """What a store error quoted in ``message`` means to the user; None if it quotes none that this module knows.

    E.g. "... AWS Error NETWORK_CONNECTION during HeadObject ..." -> "cannot connect to the S3 endpoint http://...".
    """
    meaning = next((meaning for code, meaning in _AWS_ERRORS.items() if code in message), None)
    if meaning is None:
        return None
    endpoint = resolve_endpoint(endpoint_url)
    return meaning.format(endpoint="{}://{}".format(*_endpoint_parts(endpoint)) if endpoint else "of AWS")


def _bucket_missing(uri: str, endpoint_url: str | None) -> bool:
    """Whether ``uri`` is in a bucket that does not exist: S3 answers "not found" alike for a key and a bucket."""
    fs, path = filesystem_for(uri, endpoint_url)
    if not isinstance(fs, pafs.S3FileSystem):
        return False
    try:
        return fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound
    except OSError:  # the store is failing in another way; the caller reports the original error
        return False


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether an object (or local file) is at ``uri``; a missing bucket is an error, not a no."""
    fs, path = filesystem_for(uri, endpoint_url)
    with user_errors(uri, endpoint_url):
        if fs.get_file_info(path).type == pafs.FileType.File:
            return True
    if _bucket_missing(uri, endpoint_url):
        raise UserError(f"{uri}: the bucket does not exist")
    return False


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    fs, path = filesystem_for(uri, endpoint_url)
    with user_errors(uri, endpoint_url), fs.open_input_stream(path) as f:
        return f.read()


def read_head(uri: str, length: int, endpoint_url: str | None = None) -> bytes:
    """The first ``length`` bytes of the object at ``uri`` (fewer if it is shorter): one ranged read on S3."""
    fs, path = filesystem_for(uri, endpoint_url)
    with user_errors(uri, endpoint_url), fs.open_input_file(path) as f:
        return f.read_at(min(length, f.size()), 0)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write one object atomically: readers see the previous content or ``data``, never a part of it.

    S3 makes an object visible only when its upload completes; on a local disk the data goes to a temporary file in
    the same folder first and is then renamed over the target (a rename within one filesystem is atomic in POSIX).
    """
    fs, path = filesystem_for(uri, endpoint_url)
    with user_errors(uri, endpoint_url):
        if isinstance(fs, pafs.S3FileSystem):
            with fs.open_output_stream(path) as f:
                f.write(data)
            return
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with fs.open_output_stream(tmp) as f:
                f.write(data)
            fs.move(tmp, path)
        finally:
            if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                fs.delete_file(tmp)


def read_json(uri: str, endpoint_url: str | None = None) -> Any:
    data = read_bytes(uri, endpoint_url)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise UserError(f"{uri}: not valid JSON ({exc})") from exc


def write_json(uri: str, obj: Any, endpoint_url: str | None = None) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_bytes`): the commit step of multi-object outputs."""
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), endpoint_url)


def list_files(uri: str, endpoint_url: str | None = None) -> list[FileEntry]:
    """Every object under ``uri``, recursively, sorted by key; an empty list when nothing is there.

    A missing bucket or an unreachable endpoint is an error, unlike an empty prefix.
    """
    fs, path = filesystem_for(uri, endpoint_url)
    with user_errors(uri, endpoint_url):
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except FileNotFoundError:  # an empty prefix or a missing folder (a missing bucket raises another error)
            infos = []
    root = path.rstrip("/") + "/"
    entries = [
        FileEntry(
            key=info.path[len(root):],
            size=info.size,
            mtime=info.mtime.timestamp() if info.mtime is not None else None,
        )
        for info in infos
        if info.type == pafs.FileType.File
    ]
    return sorted(entries, key=lambda e: e.key)


def delete_prefix(uri: str, endpoint_url: str | None = None) -> None:
    """Delete everything under ``uri`` (a folder or a key prefix); nothing there is not an error."""
    fs, path = filesystem_for(uri, endpoint_url)
    if isinstance(fs, pafs.S3FileSystem) and "/" not in path:
        raise UserError(f"{uri}: refusing to delete a whole bucket")
    with user_errors(uri, endpoint_url):
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass
