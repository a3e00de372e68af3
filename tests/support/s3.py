"""A real S3-compatible server for the recording tests: moto's server as a child process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.procs import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test-recordings-key",
    "AWS_SECRET_ACCESS_KEY": "test-recordings-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3Server:
    url: str
    proc: subprocess.Popen

    def client(self):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


@contextlib.contextmanager
def s3_server(log_dir: Path) -> Iterator[S3Server]:
    """``python -m moto.server`` on a free loopback port, until the block ends."""
    port = free_port()
    log = open(log_dir / "s3.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **CREDENTIALS},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the S3 server exited: {(log_dir / 's3.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("the S3 server did not answer within 30 s") from None
                time.sleep(0.1)
        yield S3Server(url, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
