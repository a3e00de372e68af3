"""Where finished recordings are kept: a local directory (a volume) or an S3-compatible bucket.

Both write a finished file under ``<YYYY-MM-DD>/<call id>.<ext>`` and name it by a
location the call's record keeps: ``file:///var/lib/moshimoshi/recordings/2025-06-01/c-….ogg``
or ``s3://bucket/prefix/2025-06-01/c-….ogg``. A location is opened only if it lies in the
configured directory or bucket and prefix (a record is data, not a capability). Retention:
``sweep(cutoff)`` deletes what was written before ``cutoff``, as the call records of that
age expire in Redis. Every method blocks: the gateway calls them in threads.

S3 credentials come from the usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
a web identity token on EKS, an instance profile...), never from the gateway's settings.
"""

from __future__ import annotations

import logging
import os
import time
import typing as tp
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
PARTIAL_DIR = ".partial"  # files being written (local mode: then renamed in place)


class NotStored(Exception):
    """A location that is not (or no longer) in this storage."""


@dataclass
class Stored:
    location: str
    bytes: int


class Storage(tp.Protocol):
    """A place for finished recordings."""

    spool: Path  # where files are written before ``put``

    def key(self, call_id: str, ext: str, when: float) -> str: ...

    def put(self, path: Path, key: str) -> Stored:
        """Move the finished file at ``path`` to ``key``; its location and size."""

    def open(self, location: str) -> tuple[int, tp.Iterator[bytes]]:
        """(size, chunks) of a stored recording; NotStored when it is not here."""

    def delete(self, location: str) -> bool: ...

    def sweep(self, cutoff: float) -> int:
        """Delete recordings written before ``cutoff`` (epoch seconds); how many."""


def recording_key(call_id: str, ext: str, when: float) -> str:
    return f"{time.strftime('%Y-%m-%d', time.gmtime(when))}/{call_id}.{ext}"


class LocalStorage:
    """Recordings in a directory (a PersistentVolume in the chart)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        self.spool = self.directory / PARTIAL_DIR
        self.spool.mkdir(parents=True, exist_ok=True)

    def key(self, call_id: str, ext: str, when: float) -> str:
        return recording_key(call_id, ext, when)

    def put(self, path: Path, key: str) -> Stored:
        target = self.directory / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return Stored(target.as_uri(), target.stat().st_size)

    def _path(self, location: str) -> Path:
        parsed = urllib.parse.urlparse(location)
        if parsed.scheme != "file":
            raise NotStored(f"not a file: location: {location[:200]!r}")
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
        if self.directory not in path.parents or PARTIAL_DIR in path.relative_to(self.directory).parts:
            raise NotStored("the location is not in this gateway's recording directory")
        return path

    def open(self, location: str) -> tuple[int, tp.Iterator[bytes]]:
        path = self._path(location)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise NotStored(
                "the recording is not on this gateway's disk (expired, or kept by another "
                "replica: use an S3 bucket or a shared volume with several gateways)"
            ) from None
        size = os.fstat(handle.fileno()).st_size

        def chunks() -> tp.Iterator[bytes]:
            with handle:
                while chunk := handle.read(READ_CHUNK):
                    yield chunk

        return size, chunks()

    def delete(self, location: str) -> bool:
        try:
            self._path(location).unlink()
            return True
        except (FileNotFoundError, NotStored):
            return False

    def sweep(self, cutoff: float) -> int:
        removed = 0
        for root, _dirs, files in os.walk(self.directory, topdown=False):
            for name in files:
                path = Path(root) / name
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
            if Path(root) not in (self.directory, self.spool) and not os.listdir(root):
                try:
                    os.rmdir(root)
                except OSError:
                    pass
        return removed


class S3Storage:
    """Recordings in an S3-compatible bucket (AWS S3, MinIO, Ceph, GCS's S3 API...)."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        spool: str | Path,
    ) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.spool = Path(spool).resolve() / PARTIAL_DIR
        self.spool.mkdir(parents=True, exist_ok=True)
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
        )

    def key(self, call_id: str, ext: str, when: float) -> str:
        return self.prefix + recording_key(call_id, ext, when)

    def put(self, path: Path, key: str) -> Stored:
        size = path.stat().st_size
        content_type = "audio/ogg" if key.endswith(".ogg") else "audio/wav"
        self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"ContentType": content_type})
        path.unlink()
        return Stored(f"s3://{self.bucket}/{key}", size)

    def _key(self, location: str) -> str:
        parsed = urllib.parse.urlparse(location)
        key = parsed.path.lstrip("/")
        if (
            parsed.scheme != "s3"
            or parsed.netloc != self.bucket
            or not key.startswith(self.prefix)
            or ".." in key.split("/")
        ):
            raise NotStored("the location is not in this gateway's recording bucket")
        return key

    def open(self, location: str) -> tuple[int, tp.Iterator[bytes]]:
        from botocore.exceptions import ClientError

        key = self._key(location)
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotStored("the recording is no longer in the bucket (expired)") from None
            raise
        body = answer["Body"]

        def chunks() -> tp.Iterator[bytes]:
            try:
                while chunk := body.read(READ_CHUNK):
                    yield chunk
            finally:
                body.close()

        return int(answer["ContentLength"]), chunks()

    def delete(self, location: str) -> bool:
        try:
            key = self._key(location)
        except NotStored:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=key)
        return True

    def sweep(self, cutoff: float) -> int:
        removed = 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            old = [
                {"Key": item["Key"]} for item in page.get("Contents", []) if item["LastModified"].timestamp() < cutoff
            ]
            for first in range(0, len(old), 1000):
                batch = old[first : first + 1000]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                removed += len(batch)
        for path in self.spool.iterdir():  # files a crash left behind
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                continue
        return removed
