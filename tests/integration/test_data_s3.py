"""S3 ImageFolder sources against a real (moto) S3 server on 127.0.0.1."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from botocore.exceptions import ClientError
from PIL import Image

from visionpipe.config import DataConfig
from visionpipe.data import DatasetError, prepare_dataset, read_manifest, source_fingerprint
from visionpipe.data.s3 import parse_s3_uri, s3_client, s3_error
from visionpipe.data.sources import materialize_source, sources_root

pytestmark = pytest.mark.integration


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def bucket(s3_env: str) -> str:
    """A fresh bucket holding an ImageFolder under ``pets/`` (and a decoy next to it)."""
    name = f"vp-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    client.create_bucket(Bucket=name)
    for i in range(12):
        cls = ("cat", "dog")[i % 2]
        client.put_object(Bucket=name, Key=f"pets/{cls}/{i:03d}.png", Body=_png(i))
    client.put_object(Bucket=name, Key="pets/dog/broken.png", Body=b"not a png")
    client.put_object(Bucket=name, Key="petsbad/cat/x.png", Body=_png(99))  # same prefix text
    return name


def test_client_honours_the_endpoint_and_compat_options(s3_env: str) -> None:
    client = s3_client()
    assert client.meta.endpoint_url == s3_env
    assert client.meta.config.s3 == {"addressing_style": "path"}
    assert client.meta.config.retries["mode"] == "standard"
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"


def test_s3_imagefolder_is_prepared_and_cached(bucket: str, vp_home: Path) -> None:
    cfg = DataConfig(source=f"s3://{bucket}/pets/", min_per_class=5)
    prepared = prepare_dataset(cfg)
    assert prepared.name == "pets" and prepared.class_names == ["cat", "dog"]
    assert sum(prepared.split_counts.values()) == 12
    manifest = read_manifest(prepared.manifest_path)
    assert manifest["source"].str.startswith(f"s3://{bucket}/pets/").all()
    assert Path(prepared.root).is_relative_to(sources_root())
    report = Path(prepared.report_path).read_text()
    assert "dog/broken.png" in report and "petsbad" not in report
    cached = {p: p.stat().st_mtime_ns for p in Path(prepared.root).rglob("*.png")}
    assert len(cached) == 13
    assert prepare_dataset(cfg) == prepared
    assert {p: p.stat().st_mtime_ns for p in cached} == cached  # nothing downloaded again


def test_changed_objects_are_downloaded_again(bucket: str, vp_home: Path) -> None:
    uri = f"s3://{bucket}/pets"
    fingerprint = source_fingerprint(DataConfig(source=uri))
    first = materialize_source(uri)
    s3_client().put_object(Bucket=bucket, Key="pets/cat/000.png", Body=_png(1000))
    assert source_fingerprint(DataConfig(source=uri)) != fingerprint
    second = materialize_source(uri)
    assert second.root == first.root
    assert (first.root / "cat" / "000.png").read_bytes() == _png(1000)


def test_max_per_class_downloads_only_the_chosen(bucket: str, vp_home: Path) -> None:
    chosen = materialize_source(f"s3://{bucket}/pets", max_per_class=3, seed=0)
    assert len(chosen.files) == 6
    on_disk = sorted(p.relative_to(chosen.root).as_posix() for p in chosen.root.rglob("*.png"))
    assert on_disk == sorted(f.relpath for f in chosen.files)


def test_missing_bucket_names_bucket_and_endpoint(s3_env: str, vp_home: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        prepare_dataset(DataConfig(source="s3://no-such-bucket-here/data"))
    message = str(caught.value)
    assert "'no-such-bucket-here'" in message and s3_env in message and "Fix:" in message
    assert "testing" not in message  # the dummy credentials never appear


def test_missing_prefix_is_an_error(bucket: str, s3_env: str, vp_home: Path) -> None:
    with pytest.raises(DatasetError, match=f"no objects under s3://{bucket}/nothing at endpoint"):
        prepare_dataset(DataConfig(source=f"s3://{bucket}/nothing"))


def test_access_denied_names_bucket_endpoint_and_fix(s3_env: str) -> None:
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}},
                         "ListObjectsV2")
    message = str(s3_error(denied, s3_client(), "locked"))
    assert "access denied" in message and "'locked'" in message and s3_env in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message


def test_keys_escaping_the_prefix_are_refused(bucket: str, vp_home: Path) -> None:
    client = s3_client()
    client.put_object(Bucket=bucket, Key="pets/cat/../../../../escape.png", Body=_png(7))
    with pytest.raises(DatasetError, match="'..' would leave"):
        materialize_source(f"s3://{bucket}/pets")
    assert not list(vp_home.parent.rglob("escape.png"))


def test_s3_uris_are_parsed_strictly() -> None:
    assert parse_s3_uri("s3://bkt/a/b/") == ("bkt", "a/b")
    assert parse_s3_uri("s3://bkt") == ("bkt", "")
    for bad in ("bkt/a", "s3://", "s3://bkt/a/../b", "s3://Bad_Bucket!/x"):
        with pytest.raises(DatasetError):
            parse_s3_uri(bad)
