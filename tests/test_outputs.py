"""Images uploaded to S3 instead of inlined (output.upload_url, a job's s3Config), against
moto's S3 server over HTTP."""

from __future__ import annotations

import io
import time

import pytest
import requests
from PIL import Image

from tests.helpers import BUCKET, assert_images_close, decode, stream
from worker.jobs import JobRunner

VALID = {"prompt": "a red barn", "num_inference_steps": 2, "seed": 11}


@pytest.fixture(scope="module")
def small_results_engine(models_dir, s3_endpoint):
    """An engine whose result limit is far below an image's size: uploads are not held to it."""
    from worker.engine import Engine
    from worker.settings import Settings

    return Engine(Settings(
        models_dir=models_dir, hf_hub_offline=True, allow_private_urls=True, max_result_bytes=1024,
        aws_s3_endpoint_url=s3_endpoint, aws_access_key_id="test", aws_secret_access_key="test-secret-key",
        aws_default_region="us-east-1", write_destinations=f"s3://{BUCKET}/ s3://no-such-bucket/",
    ))


@pytest.fixture
def runner(small_results_engine):
    """This module's runner: on the engine with a small result limit."""
    return JobRunner(small_results_engine.settings, sdk_config={}, engine=small_results_engine)


def run_job(runner: JobRunner, job: dict) -> list[dict]:
    return stream(runner, job)


def stored(s3, bucket: str, key: str) -> tuple[Image.Image, str]:
    obj = s3.get_object(Bucket=bucket, Key=key)
    image = Image.open(io.BytesIO(obj["Body"].read()))
    image.load()
    return image, obj["ContentType"]


def test_upload_url_puts_each_image_and_answers_with_links(runner, run, s3):
    inline, _ = run(**VALID, num_images=2)
    items = run_job(runner, {"id": "job-7", "input": VALID | {
        "num_images": 2, "stream": True, "output": {"upload_url": f"s3://{BUCKET}/renders/"}}})
    result = items[-1]
    assert result["type"] == "result", result
    assert [image["url"] for image in result["images"]] == [
        f"s3://{BUCKET}/renders/job-7-0.png", f"s3://{BUCKET}/renders/job-7-1.png"]
    assert all("base64" not in image for image in result["images"])
    assert "upload" in result["timings"]
    uploads = [item for item in items if item.get("stage") == "upload"]
    assert uploads[-1] == {"type": "progress", "stage": "upload", "step": 2, "total": 2}
    for i, (image, expected) in enumerate(zip(result["images"], inline.images)):
        got, content_type = stored(s3, BUCKET, f"renders/job-7-{i}.png")
        assert content_type == "image/png"
        assert image["seed"] == expected.seed
        assert_images_close(decode(expected.base64), got, f"uploaded-{i}")
        # The presigned link fetches the same bytes, with no credentials.
        link = requests.get(image["presigned_url"], timeout=10)
        assert link.status_code == 200 and link.content == s3.get_object(
            Bucket=BUCKET, Key=f"renders/job-7-{i}.png")["Body"].read()


def test_a_jobs_s3config_gets_the_images_in_its_own_bucket(runner, s3, s3_endpoint):
    s3.create_bucket(Bucket="callers-bucket")
    job = {"id": "sync-abc", "input": VALID | {"output": {"format": "jpeg"}},
           "s3Config": {"accessId": "caller", "accessSecret": "caller-secret-value",
                        "bucketName": "callers-bucket", "endpointUrl": s3_endpoint}}
    result = run_job(runner, job)[-1]
    # RunPod's layout: a folder per job in the caller's bucket.
    assert result["images"][0]["url"] == "s3://callers-bucket/sync-abc/sync-abc-0.jpeg", result
    got, content_type = stored(s3, "callers-bucket", "sync-abc/sync-abc-0.jpeg")
    assert content_type == "image/jpeg" and got.format == "JPEG"


@pytest.mark.parametrize("job, expected", [
    ({"input": VALID | {"output": {"upload_url": "s3://"}}},
     "output.upload_url: names no bucket"),
    ({"input": VALID | {"output": {"upload_url": "s3://no-such-bucket/x/"}}},
     "output.upload_url: bucket 'no-such-bucket' does not exist"),
    ({"input": VALID | {"output": {"upload_url": "s3://elsewhere/x/"}}},
     "output.upload_url: s3://elsewhere/x/bad-0.png is not where this endpoint lets requests write "
     "(WRITE_DESTINATIONS: s3://models/, s3://no-such-bucket/)"),
    ({"input": VALID | {"output": {"upload_url": f"s3://{BUCKET}/a//b/"}}},
     "output.upload_url: 'a//b/bad': a key has no empty, '.' or '..' parts"),
    ({"input": VALID | {"output": {"upload_url": f"s3://{BUCKET}/a/../b/"}}},
     "output.upload_url: 'a/../b/bad': a key has no empty, '.' or '..' parts"),
    ({"input": VALID, "s3Config": {"accessId": "a", "bucketName": "b", "endpointUrl": "http://x"}},
     "s3Config.accessSecret: field required"),
    ({"input": VALID, "s3Config": {"accessId": "a", "accessSecret": "do-not-echo-me", "endpointUrl": "ftp://x"}},
     "s3Config.endpointUrl: string should match pattern"),
])
def test_unusable_destinations_name_the_field(runner, s3, job, expected):
    answer = run_job(runner, {"id": "bad"} | job)[-1]
    assert answer["error"].startswith(expected), answer
    assert "do-not-echo-me" not in answer["error"]
    assert run_job(runner, {"id": "next", "input": VALID | {"output": {"upload_url": f"s3://{BUCKET}/ok/"}}}
                   )[-1]["type"] == "result"


def test_s3config_endpoint_on_a_private_address_is_refused_by_default(small_results_engine, s3_endpoint):
    runner = JobRunner(small_results_engine.settings.model_copy(update={"allow_private_urls": False}), sdk_config={},
                       engine=small_results_engine)
    job = {"id": "j", "input": VALID, "s3Config": {
        "accessId": "a", "accessSecret": "caller-secret-value", "bucketName": BUCKET, "endpointUrl": s3_endpoint}}
    answer = run_job(runner, job)[-1]
    assert answer["error"].startswith("s3Config.endpointUrl: host '127.0.0.1' is a private address"), answer


def test_without_an_upload_images_over_the_result_limit_are_refused(runner):
    answer = run_job(runner, {"id": "big", "input": VALID})[-1]
    assert answer["error"].startswith("output: the images come to"), answer
    assert "output.upload_url" in answer["error"]


def test_uploads_through_the_checked_session_work(s3_endpoint, s3):
    """What botocore sends through worker.sources.urls' sessions (how a caller's endpoint is reached)
    comes back parsed like its own replies: small and large uploads, reads, errors."""
    import boto3
    from botocore.exceptions import ClientError

    from worker.outputs import send_through
    from worker.settings import Settings

    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="caller",
                          aws_secret_access_key="caller-secret-value", region_name="us-east-1")
    client.meta.events.register("before-send.s3", send_through(Settings(allow_private_urls=True)))
    client.put_object(Bucket=BUCKET, Key="through/x.png", Body=b"\x89PNG-bytes", ContentType="image/png")
    got = s3.get_object(Bucket=BUCKET, Key="through/x.png")
    assert got["Body"].read() == b"\x89PNG-bytes" and got["ContentType"] == "image/png"
    assert client.head_object(Bucket=BUCKET, Key="through/x.png")["ContentLength"] == 10
    large = bytes(range(256)) * 8192  # 2 MiB: botocore asks for "Expect: 100-continue" above 1 MB
    client.put_object(Bucket=BUCKET, Key="through/large.png", Body=large)
    assert s3.get_object(Bucket=BUCKET, Key="through/large.png")["Body"].read() == large
    with pytest.raises(ClientError) as error:
        client.put_object(Bucket="no-such-bucket", Key="x", Body=b"x")
    assert error.value.response["Error"]["Code"] == "NoSuchBucket"


def test_a_callers_endpoint_is_refused_on_the_connection_too(s3_endpoint, s3):
    """DNS rebinding: the endpoint's name looked public when checked, the connection lands on a
    private address. The connected socket is checked before anything is sent on it."""
    from worker.errors import UserInputError
    from worker.outputs import _client
    from worker.settings import Settings

    client = _client(Settings(), s3_endpoint, "caller", "caller-secret-value", callers=True)
    with pytest.raises(UserInputError, match=r"^s3Config\.endpointUrl: host '127\.0\.0\.1' is a private address"):
        client.put_object(Bucket=BUCKET, Key="rebound/x.png", Body=b"x")
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix="rebound/")


def test_a_callers_endpoint_that_does_not_answer_cannot_hold_the_job(small_results_engine):
    """An s3Config endpoint is the caller's server: silent, it is cut at the request deadline."""
    from http.server import BaseHTTPRequestHandler

    from tests.helpers import Loopback

    class Silent(BaseHTTPRequestHandler):
        def do_HEAD(self):
            time.sleep(20)

        do_PUT = do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = Loopback(Silent)
    settings = small_results_engine.settings.model_copy(update={"url_deadline_s": 1})
    runner = JobRunner(settings, sdk_config={}, engine=small_results_engine)
    try:
        job = {"id": "held", "input": VALID, "s3Config": {
            "accessId": "a", "accessSecret": "caller-secret-value", "bucketName": "theirs", "endpointUrl": server.url}}
        start = time.monotonic()
        answer = run_job(runner, job)[-1]
        assert answer["error"] == ("s3Config.endpointUrl: upload too slow: no answer within 1 s (URL_DEADLINE_S, "
                                   "URL_MIN_MB_PER_S)"), answer
        assert time.monotonic() - start < 5
    finally:
        server.close()
