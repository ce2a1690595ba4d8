"""Cold starts when things go wrong on the way: a busy store, a full disk, a worker killed
mid-download. Each fault gets a clear answer naming the field, nothing half-installed is ever
loaded, and the worker serves the next job. (A second job during a fetch: test_streaming.py;
a dropped connection resumes: test_archives.py.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, generate, pack, worker_env
from worker.errors import ModelSourceError


@pytest.fixture(scope="module")
def archive(tiny_dir) -> bytes:
    return pack(tiny_dir)


def installed(settings) -> list[str]:
    root = settings.models_dir / "archives"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def staged(settings) -> list[str]:
    root = settings.models_dir / ".staging"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_a_busy_store_is_asked_again_after_a_pause(settings, http, archive):
    """503 Slow Down on the first request and on a range: asked again, the model arrives whole."""
    http.files["/tiny.tar.zst"] = archive
    http.busy["/tiny.tar.zst"] = [True, True, False, False, True]  # the probe twice, then a range
    result = generate(settings, {"url": http.url + "/tiny.tar.zst"})
    assert result.model.source == "url"
    asked = [p for p, _ in http.requests].count("/tiny.tar.zst")
    assert asked == -(-len(archive) // 2**20) + 3  # every range once, plus the three refused


def test_a_store_busy_too_long_fails_the_job_naming_model_url(settings, http, archive):
    http.files["/tiny.tar.zst"] = archive
    http.busy["/tiny.tar.zst"] = [True] * 10
    patient = settings.model_copy(update={"download_retries": 2})
    with pytest.raises(ModelSourceError, match=r"^model\.url: .*/tiny\.tar\.zst: download failed after 2 retries "
                                               r"\(HTTP 503\)$"):
        generate(patient, {"url": http.url + "/tiny.tar.zst"})
    assert installed(patient) == [] and staged(patient) == []
    assert generate(patient, {}).model.source in ("embedded", "memory")  # and the worker goes on


def test_a_full_disk_fails_the_job_and_leaves_nothing(settings, http, archive, tiny_dir, tmp_path):
    """In a worker process whose files may not grow past 64 KiB (as a full disk refuses writes)."""
    http.files["/tiny.tar.zst"] = archive
    generate(settings, {})  # the embedded model, installed before the disk fills
    script = (
        "import resource, signal, sys\n"
        "from schemas import InferenceRequest\n"
        "from worker.engine import Engine\n"
        "from worker.settings import Settings\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))\n"
        "engine = Engine(Settings())\n"
        "def job(model):\n"
        "    request = InferenceRequest.model_validate({'prompt': 'p', 'num_inference_steps': 1, 'model': model})\n"
        "    try:\n"
        "        return engine.generate(request, lambda e: None, lambda: False).model.source\n"
        "    except Exception as exc:\n"
        "        return str(exc)\n"
        "print(job({'url': sys.argv[1]}))\n"
        "print(job({}))\n"
    )
    env = worker_env(settings.models_dir, ALLOW_PRIVATE_URLS="1")
    done = subprocess.run([sys.executable, "-c", script, http.url + "/tiny.tar.zst"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    failed, then = done.stdout.strip().splitlines()[-2:]
    assert failed == ("model.url: no room left in MODELS_DIR to extract the archive (File too large); "
                      "nothing was installed")
    assert then == "embedded"
    assert installed(settings) == [] and staged(settings) == []


def test_a_worker_killed_mid_download_leaves_nothing_the_next_one_loads(settings, http, archive):
    """The fetch starts over in the next worker; what the dead one staged is swept."""
    http.files["/tiny.tar.zst"] = archive
    http.pause["/tiny.tar.zst"] = 0.3
    script = (
        "import sys\n"
        "from schemas import ModelSpec\n"
        "from worker.settings import Settings\n"
        "from worker.sources.cache import DiskCache\n"
        "from worker.sources.locate import fetch_archive\n"
        "from worker.sources.refs import model_ref\n"
        "settings = Settings()\n"
        "fetch_archive(model_ref(ModelSpec(url=sys.argv[1]), settings, 'cpu'), settings, DiskCache(settings),"
        " lambda e: None)\n"
    )
    env = worker_env(settings.models_dir, ALLOW_PRIVATE_URLS="1", DOWNLOAD_CHUNK_MB="1", DOWNLOAD_CONCURRENCY="1")
    worker = subprocess.Popen([sys.executable, "-c", script, http.url + "/tiny.tar.zst"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 60
    while not any((settings.models_dir / ".staging").glob("*/*")):  # a file has landed
        assert worker.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert installed(settings) == [] and staged(settings)  # half an archive, staged: never installed

    http.pause.pop("/tiny.tar.zst")
    result = generate(settings, {"url": http.url + "/tiny.tar.zst"})
    assert result.model.source == "url"  # fetched again from the start, not found half there
    assert len(installed(settings)) == 1 and staged(settings) == []


def test_an_s3_store_saying_slow_down_is_asked_again(settings, http, archive):
    """boto3's standard retries, as the worker configures them (DOWNLOAD_RETRIES), on HEAD and on a part."""
    http.files["/models/tiny.tar.zst"] = archive
    http.busy["/models/tiny.tar.zst"] = [True, False, False, True]  # the first HEAD, and a GET after
    store = settings.model_copy(update={"aws_s3_endpoint_url": http.url, "download_chunk_mb": 8})
    result = generate(store, {"url": "s3://models/tiny.tar.zst"})
    assert result.model.source == "url"
    assert [p for p, _ in http.requests].count("/models/tiny.tar.zst") >= 4  # both refusals asked again
    assert http.busy["/models/tiny.tar.zst"] == []
