"""moto's S3 server on loopback, with credentials checked, for tests that download from S3.

The project reads S3 with boto3, so the tests give boto3 a real HTTP endpoint: moto's
standalone server (Apache-2.0; MinIO is AGPL), run in this process so that a test can reach
behind the API and change an object's stored bytes while its ETag stays (a corrupted store).

moto accepts any key until its IAM mode is switched on; :func:`start_s3` creates a user with
read and write rights and one that may only read, then switches it on, so signatures,
unknown keys and policies are checked as AWS checks them. moto names two actions its own
way: listing is ``s3:ListObjectsV2`` (AWS: ``s3:ListBucket``) and HEAD is ``s3:HeadObject``
(AWS: ``s3:GetObject``), so the reader's policy grants ``s3:List*`` and ``s3:HeadObject``.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGION = "us-east-1"
_READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:HeadObject"], "Resource": "*"}]}
_READ_WRITE = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:*"], "Resource": "*"}]}


@dataclass(frozen=True)
class Key:
    """An access key pair, and the environment a download step would be given."""

    access_key_id: str
    secret_access_key: str

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key}


class S3Store:
    """A running moto server: its endpoint, a writer's and a reader's key, and helpers."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        bootstrap = Key("testing", "testing")  # any key passes while auth is off
        self.writer = self._user(bootstrap, "writer", _READ_WRITE)
        self.reader = self._user(bootstrap, "reader", _READ_ONLY)
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0",
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    def client(self, key: Key | None = None, service: str = "s3") -> Any:
        import boto3

        key = key or self.writer
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key.access_key_id,
                            aws_secret_access_key=key.secret_access_key)

    def upload_folder(self, folder: Path, bucket: str, prefix: str,
                      multipart_threshold: int = 8 << 20) -> None:
        """Put every file of ``folder`` under ``s3://bucket/prefix/``, as ``aws s3 sync`` does;
        files above ``multipart_threshold`` go up in 5 MiB parts (an ``<md5>-N`` ETag)."""
        from boto3.s3.transfer import TransferConfig

        s3 = self.client()
        if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=bucket)
        config = TransferConfig(multipart_threshold=multipart_threshold,
                                multipart_chunksize=5 << 20)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix.strip('/')}/{path.relative_to(folder)}".lstrip("/")
                s3.upload_file(str(path), bucket, key, Config=config)

    def corrupt(self, bucket: str, key: str) -> None:
        """Flip the first stored byte of an object behind the API: same size, same ETag."""
        from moto.s3.models import s3_backends

        for account in s3_backends.values():
            stored = account["aws"].buckets.get(bucket)
            if stored is not None and key in stored.keys:
                item = stored.keys[key]
                value = item.value
                item.value = bytes([value[0] ^ 0xFF]) + value[1:]
                return
        raise KeyError(f"s3://{bucket}/{key}")

    def stop(self) -> None:
        self._server.stop()

    def _user(self, admin: Key, name: str, policy: dict[str, Any]) -> Key:
        iam = self.client(admin, "iam")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy",
                            PolicyDocument=json.dumps(policy))
        created = iam.create_access_key(UserName=name)["AccessKey"]
        return Key(created["AccessKeyId"], created["SecretAccessKey"])


def start_s3() -> S3Store:
    """Start a store with auth on; call :meth:`S3Store.stop` when done."""
    return S3Store()
