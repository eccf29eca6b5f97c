"""A boto3 S3 client for AWS and S3-compatible stores, and errors a user can act on."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from visionpipe.errors import DatasetError

log = logging.getLogger(__name__)

# boto3 clients are generated at run time; typed stubs are not a dependency of this project.
S3Client = Any

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,254}$")
_MISSING = {"NoSuchBucket"}
_DENIED = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
}


def endpoint_from_env() -> str | None:
    """The S3 endpoint named by ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> S3Client:
    """An S3 client with path-style addressing and standard retries.

    The endpoint is passed explicitly although recent botocore reads the same variables: older
    releases in the supported range ignore them and would silently talk to AWS instead.
    """
    options: dict[str, Any] = {
        # MinIO, Ceph and moto serve buckets under the path, not as virtual hosts.
        "s3": {"addressing_style": "path"},
        "retries": {"mode": "standard", "max_attempts": 5},
    }
    # botocore >= 1.36 sends CRC checksums by default, which many S3-compatible stores reject;
    # older releases neither have these options nor send the checksums.
    if "request_checksum_calculation" in Config.OPTION_DEFAULTS:
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_from_env(), config=Config(**options))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/prefix`` into the bucket and the prefix without surrounding slashes."""
    if not uri.startswith("s3://"):
        raise DatasetError(f"{uri!r} is not an S3 URI; expected s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not _BUCKET.match(bucket):
        raise DatasetError(f"{uri!r} has no valid bucket name; expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise DatasetError(f"refusing S3 prefix {prefix!r}: empty, '.' or '..' segments")
    return bucket, prefix


def iter_objects(client: S3Client, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object (``Key``, ``ETag``, ``Size``...) under ``prefix``, translating errors."""
    folder = f"{prefix}/" if prefix else ""
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            yield from page.get("Contents", [])
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(exc, client, bucket) from exc


def list_objects(client: S3Client, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """The objects under ``prefix``; a prefix with no objects is an error, not an empty dataset."""
    objects = [obj for obj in iter_objects(client, bucket, prefix) if not obj["Key"].endswith("/")]
    if not objects:
        endpoint = client.meta.endpoint_url
        raise DatasetError(
            f"no objects under s3://{bucket}/{prefix} at endpoint {endpoint}. Fix: upload an "
            f"ImageFolder there (s3://{bucket}/{prefix}/<class>/<image>) or correct data.source."
        )
    return objects


def s3_error(exc: Exception, client: S3Client, bucket: str) -> DatasetError:
    """A DatasetError naming the bucket, the endpoint and the likely fix (never the credentials)."""
    endpoint = client.meta.endpoint_url
    where = f"bucket {bucket!r} at endpoint {endpoint}"
    if isinstance(exc, NoCredentialsError):
        return DatasetError(f"no AWS credentials for {where}. Fix: set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE.")
    if isinstance(exc, EndpointConnectionError):
        return DatasetError(f"cannot reach {where}. Fix: start the S3 server or correct "
                            "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.")
    code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else ""
    if code in _MISSING or (code == "404" and "Bucket" in str(exc)):
        return DatasetError(f"{where} does not exist. Fix: create it (aws s3 mb s3://{bucket} "
                            f"--endpoint-url {endpoint}), or correct data.source or "
                            "AWS_ENDPOINT_URL_S3.")
    if code in _DENIED:
        return DatasetError(f"access denied to {where} ({code}). Fix: use credentials allowed "
                            "s3:ListBucket and s3:GetObject on it (AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE).")
    return DatasetError(f"S3 request to {where} failed ({code or type(exc).__name__}): {exc}")
