"""Prefect results on S3, so a retry on another worker finds the cached results.

    python -m deployments.results --bucket visionpipe-artifacts [--folder prefect-results]
                                  [--endpoint https://minio.example.org]

creates (or updates) two blocks on the Prefect server at ``PREFECT_API_URL``:

- ``aws-credentials/visionpipe-s3``: no keys in it; each worker's boto3 finds its own (environment,
  instance profile, IRSA), so no secret is stored on the Prefect server. Only the endpoint of an
  S3-compatible store and the client settings they need (path-style addressing, checksums only
  when required, standard retries) are recorded;
- ``s3-bucket/visionpipe-results``: the bucket and folder where results and cache records go.

Workers (and ``make serve``) then need ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=
s3-bucket/visionpipe-results`` and ``PREFECT_RESULTS_PERSIST_BY_DEFAULT=true``; ``make stack-up``
does all of this for the local stack and writes both into ``stack.env``.
"""

from __future__ import annotations

import argparse
import sys

CREDENTIALS_BLOCK = "visionpipe-s3"
RESULTS_BLOCK = "visionpipe-results"
SETTING = f"PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/{RESULTS_BLOCK}"


def create(bucket: str, folder: str, endpoint: str | None) -> str:
    """Save both blocks (overwriting earlier ones); return the setting workers need."""
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    config = {"s3": {"addressing_style": "path"}, "retries": {"mode": "standard", "max_attempts": 5},
              "request_checksum_calculation": "when_required",
              "response_checksum_validation": "when_required"}
    credentials = AwsCredentials(aws_client_parameters=AwsClientParameters(
        endpoint_url=endpoint, config=config))
    credentials.save(CREDENTIALS_BLOCK, overwrite=True)
    S3Bucket(bucket_name=bucket, bucket_folder=folder, credentials=credentials).save(
        RESULTS_BLOCK, overwrite=True)
    return SETTING


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--folder", default="prefect-results")
    parser.add_argument("--endpoint", default=None, help="S3-compatible endpoint (MinIO, moto)")
    args = parser.parse_args(argv)
    print(create(args.bucket, args.folder, args.endpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
