"""Recordings in an S3-compatible bucket, against a real S3 server (moto's, as a process):
upload, reading back, locations outside the bucket refused, retention."""

from __future__ import annotations

import time

import pytest

from service.gateway.recording.storage import NotStored, S3Storage
from tests.support.s3 import CREDENTIALS, s3_server

pytestmark = pytest.mark.system


def test_recordings_are_uploaded_read_back_and_swept_at_the_end_of_the_retention(tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with s3_server(tmp_path) as server:
        client = server.client()
        client.create_bucket(Bucket="calls")
        client.put_object(Bucket="calls", Key="other/keep.txt", Body=b"not ours")
        storage = S3Storage("calls", prefix="recordings", endpoint_url=server.url, spool=tmp_path / "spool")
        made = storage.spool / "c-1.ogg"
        made.write_bytes(b"OggS" + bytes(range(256)) * 1000)
        stored = storage.put(made, storage.key("c-1", "ogg", time.time()))
        assert stored.location == f"s3://calls/recordings/{time.strftime('%Y-%m-%d', time.gmtime())}/c-1.ogg"
        assert stored.bytes == 4 + 256_000 and not made.exists()  # the local copy is gone
        head = client.head_object(Bucket="calls", Key=stored.location.removeprefix("s3://calls/"))
        assert head["ContentType"] == "audio/ogg"
        size, chunks = storage.open(stored.location)
        assert size == stored.bytes and b"".join(chunks) == b"OggS" + bytes(range(256)) * 1000
        for location in (
            "s3://other-bucket/recordings/x.ogg",
            "s3://calls/other/keep.txt",
            "s3://calls/recordings/../other/keep.txt",
            "file:///etc/passwd",
        ):
            with pytest.raises(NotStored):
                storage.open(location)
        assert storage.sweep(time.time() - 3600) == 0  # within the retention: kept
        assert storage.sweep(time.time() + 60) == 1  # past it: deleted (and nothing else)
        with pytest.raises(NotStored, match="expired"):
            storage.open(stored.location)
        keys = [item["Key"] for item in client.list_objects_v2(Bucket="calls").get("Contents", [])]
        assert keys == ["other/keep.txt"]


def test_a_missing_bucket_fails_the_upload_with_the_servers_answer(tmp_path, monkeypatch):
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    with s3_server(tmp_path) as server:
        storage = S3Storage("no-such-bucket", endpoint_url=server.url, spool=tmp_path / "spool")
        made = storage.spool / "c-2.wav"
        made.write_bytes(b"RIFF")
        with pytest.raises(Exception, match="NoSuchBucket"):
            storage.put(made, storage.key("c-2", "wav", time.time()))
