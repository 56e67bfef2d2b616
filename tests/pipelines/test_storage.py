"""pipelines.storage against a real S3 endpoint (moto on 127.0.0.1) and a real local folder."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from tests.support import free_port
from pipelines import storage
from pipelines.errors import UserError


def test_uris_map_to_filesystem_and_path(tmp_path, monkeypatch):
    fs, path = storage.filesystem_for("s3://bucket/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"

    monkeypatch.chdir(tmp_path)
    for uri in ("rel/x", str(tmp_path / "rel" / "x"), f"file://{tmp_path}/rel/x"):
        fs, path = storage.filesystem_for(uri)
        assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel" / "x")

    assert storage.join("s3://b/out/", "data-1", "/x.parquet") == "s3://b/out/data-1/x.parquet"
    for bad in ("gs://bucket/x", "s3://", "s3:///"):
        with pytest.raises(UserError, match="^" + bad.rstrip("/")):
            storage.filesystem_for(bad)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_write_read_list_delete(where, bucket, tmp_path):
    root = f"s3://{bucket}/root" if where == "s3" else str(tmp_path / "root")

    storage.write_json(storage.join(root, "a/b.json"), {"x": 1})
    storage.write_bytes(storage.join(root, "c.bin"), b"abc")
    storage.write_json(storage.join(root, "a/b.json"), {"x": 2})  # replaced whole, no temporary file left behind

    assert storage.read_json(storage.join(root, "a/b.json")) == {"x": 2}
    assert storage.read_bytes(storage.join(root, "c.bin")) == b"abc"
    assert storage.exists(storage.join(root, "c.bin")) and not storage.exists(storage.join(root, "nope"))
    entries = storage.list_files(root)
    assert [(e.key, e.size) for e in entries] == [("a/b.json", len(b'{\n  "x": 2\n}\n')), ("c.bin", 3)]
    assert all(e.mtime is not None for e in entries)

    storage.delete_prefix(storage.join(root, "a"))
    storage.delete_prefix(storage.join(root, "a"))  # nothing there any more: not an error
    assert [e.key for e in storage.list_files(root)] == ["c.bin"]
    assert storage.list_files(storage.join(root, "missing")) == []


def test_explicit_endpoint_wins_over_environment(bucket, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    storage.write_bytes(f"s3://{bucket}/x", b"1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    assert storage.read_bytes(f"s3://{bucket}/x", endpoint_url=endpoint) == b"1"


def test_missing_bucket_is_a_one_line_error_naming_the_uri(s3):
    uri = "s3://no-such-bucket-here/raw"
    for call in (
        lambda: storage.list_files(uri),
        lambda: storage.read_json(storage.join(uri, "m.json")),
        lambda: storage.write_json(storage.join(uri, "m.json"), {}),
    ):
        with pytest.raises(UserError) as err:
            call()
        message = str(err.value)
        assert message.startswith(uri) and "bucket does not exist" in message and "\n" not in message


def test_unreachable_endpoint_names_uri_and_endpoint_not_credentials(s3):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError) as err:
        storage.list_files("s3://bucket/raw", endpoint_url=endpoint)
    message = str(err.value)
    assert message == f"s3://bucket/raw: cannot connect to the S3 endpoint {endpoint}"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message and os.environ["AWS_ACCESS_KEY_ID"] not in message


def test_missing_object_and_bad_json(bucket):
    with pytest.raises(UserError, match=f"^s3://{bucket}/none.json: not found$"):
        storage.read_json(f"s3://{bucket}/none.json")
    storage.write_bytes(f"s3://{bucket}/bad.json", b"{not json")
    with pytest.raises(UserError, match=f"^s3://{bucket}/bad.json: not valid JSON"):
        storage.read_json(f"s3://{bucket}/bad.json")


def test_delete_refuses_a_whole_bucket(bucket):
    storage.write_bytes(f"s3://{bucket}/keep", b"1")
    with pytest.raises(UserError, match="whole bucket"):
        storage.delete_prefix(f"s3://{bucket}")
    assert storage.exists(f"s3://{bucket}/keep")
