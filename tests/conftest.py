"""Shared fixtures: a real S3 API (moto's server, bound to 127.0.0.1) for object-store tests, no weights to
download, and the labelling stage of in-process labelling runs."""

from __future__ import annotations

import uuid

import pytest

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_server() -> str:
    """One moto S3 server for the session; yields its endpoint URL (``http://127.0.0.1:<port>``)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The moto endpoint, with AWS_ENDPOINT_URL and fake credentials set in the environment for this test
    (s3fs, boto3 and subprocesses started by the test all use them)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    for name, value in FAKE_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    return moto_server


@pytest.fixture
def make_bucket(s3_endpoint: str):
    """``make_bucket(prefix="test") -> "s3://<new unique bucket>"`` on the moto server."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def make(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


OFFLINE_HUB = "https://offline.invalid"  # RFC 2606: a name that never resolves, so no download can start
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """No weights can be downloaded, on any machine: the Hugging Face hub's endpoint does not resolve and its
    cache is an empty folder, in this process (``huggingface_hub.constants``) and in the environment that
    subprocesses get (returned)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", OFFLINE_HUB)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return {"HF_ENDPOINT": OFFLINE_HUB, "HF_HUB_CACHE": str(cache)}


@pytest.fixture(scope="session")
def labeler():
    """The labelling stage of tests/labelled_stores.py (random-weight tiny CLIP, encoding its own masks), built
    once."""
    from labelled_stores import CLASSES, CONFIG

    from denseclip.ray.labeling import Labeler

    return Labeler(CONFIG, CLASSES, encode=True)
