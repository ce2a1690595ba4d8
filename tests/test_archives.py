"""Tier 2: models from archives on S3 (moto's server, over HTTP) and HTTP (a Range server).

Every test runs real transfers on loopback: parallel ranged GETs, boto3's transfer manager,
streamed zstd + tar extraction into MODELS_DIR.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import BUCKET, RangeServer, at_once, generate, pack
from worker.errors import ModelSourceError, UserInputError
from worker.settings import Settings


def hostile(kind: str) -> bytes:
    """A tar whose second member tries to escape (after one harmless file)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        ok = tarfile.TarInfo("model/model_index.json")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"{}"))
        names = {"traversal": "model/../../escaped.txt", "absolute": "/tmp/escaped.txt"}
        evil = tarfile.TarInfo(names.get(kind, "model/evil"))
        if kind == "symlink":
            evil.type, evil.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        elif kind == "hardlink":
            evil.type, evil.linkname = tarfile.LNKTYPE, "/etc/passwd"
        elif kind == "device":
            evil.type, evil.devmajor, evil.devminor = tarfile.CHRTYPE, 1, 3
        else:
            evil.size = 6
        tar.addfile(evil, io.BytesIO(b"escape") if evil.isfile() else None)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive(tiny_dir) -> bytes:
    return pack(tiny_dir)


def installed(settings: Settings) -> list[str]:
    root = settings.models_dir / "archives"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def assert_nothing_left(settings: Settings) -> None:
    assert installed(settings) == []
    staging = settings.models_dir / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_https_tar_zst_then_cache_gives_the_same_image(settings, http, archive, tiny_dir):
    http.files["/tiny.tar.zst"] = archive
    events: list = []
    first = generate(settings, {"url": http.url + "/tiny.tar.zst"}, events)
    assert (first.model.source, first.model.id) == ("url", "url:tiny.tar.zst")
    assert "download" in first.timings
    downloads = [e for e in events if e.stage == "download"]
    assert downloads[-1].step == downloads[-1].total == len(archive)
    ranged = [r for p, r in http.requests if p == "/tiny.tar.zst"]
    assert len(ranged) == -(-len(archive) // 2**20) and all(r.startswith("bytes=") for r in ranged)

    again = generate(settings, {"url": http.url + "/tiny.tar.zst"})  # a new worker, same volume
    assert again.model.source == "cache"
    direct = generate(settings, {"id": str(tiny_dir)})
    assert first.images[0].base64 == again.images[0].base64 == direct.images[0].base64


def test_plain_tar_with_files_at_the_root(settings, http, tiny_dir):
    http.files["/flat.tar"] = pack(tiny_dir, zstd=False, folder=None)
    assert generate(settings, {"url": http.url + "/flat.tar"}).model.source == "url"


@pytest.mark.parametrize("form", ["s3://models/team/tiny.tar.zst", "s3:///models/team/tiny.tar.zst"])
def test_s3_url_forms(settings, s3, archive, form):
    s3.put_object(Bucket=BUCKET, Key="team/tiny.tar.zst", Body=archive)
    result = generate(settings, {"url": form, "id": "acme/tiny"})
    assert (result.model.source, result.model.id) == ("url", "acme/tiny")


def test_bare_s3_means_default_bucket_and_conventional_name(settings, s3, archive):
    s3.put_object(Bucket=BUCKET, Key="models--acme--tiny--fp32.tar.zst", Body=archive)
    assert generate(settings, {"url": "s3://", "id": "acme/tiny"}).model.source == "url"
    with pytest.raises(ModelSourceError, match=r"^model\.url: a bare s3:// URL needs model\.id"):
        generate(settings, {"url": "s3://"})


def test_missing_s3_object_names_the_field(settings, s3):
    with pytest.raises(ModelSourceError, match=r"^model\.url: s3://models/nope\.tar\.zst does not exist"):
        generate(settings, {"url": "s3://models/nope.tar.zst"})


def test_sha256_fragment_good_and_bad(settings, http, archive):
    http.files["/tiny.tar.zst"] = archive
    digest = hashlib.sha256(archive).hexdigest()
    with pytest.raises(ModelSourceError, match=rf"^model\.url: sha256 mismatch: expected {'0' * 64}, got {digest}"):
        generate(settings, {"url": f"{http.url}/tiny.tar.zst#sha256={'0' * 64}"})
    assert_nothing_left(settings)
    assert generate(settings, {"url": f"{http.url}/tiny.tar.zst#sha256={digest}"}).model.source == "url"


def test_sha256_sidecar_object_on_s3(settings, s3, archive):
    s3.put_object(Bucket=BUCKET, Key="side/tiny.tar.zst", Body=archive)
    s3.put_object(Bucket=BUCKET, Key="side/tiny.tar.zst.sha256", Body=b"f" * 64 + b"  tiny.tar.zst\n")
    with pytest.raises(ModelSourceError, match="sha256 mismatch"):
        generate(settings, {"url": "s3://models/side/tiny.tar.zst"})
    s3.put_object(Bucket=BUCKET, Key="side/tiny.tar.zst.sha256", Body=hashlib.sha256(archive).hexdigest().encode())
    assert generate(settings, {"url": "s3://models/side/tiny.tar.zst"}).model.source == "url"


def test_dropped_connection_resumes_from_the_last_good_byte(settings, http, archive):
    http.files["/tiny.tar.zst"] = archive
    http.drop["/tiny.tar.zst"] = 300_000  # the first range breaks off 300 kB in
    result = generate(settings, {"url": http.url + "/tiny.tar.zst"})
    assert result.model.source == "url"
    resumed = [int(r[6:].split("-")[0]) for _, r in http.requests if r and r.endswith(f"-{2**20 - 1}")]
    assert len(resumed) == 2 and 200_000 <= resumed[1] <= 300_000, resumed  # resumed, not restarted


def test_truncated_archive_fails_cleanly_and_the_next_request_works(settings, http, archive):
    http.files["/cut.tar.zst"] = archive[: len(archive) // 2]
    with pytest.raises(ModelSourceError, match=r"^model\.url: archive is truncated or corrupt"):
        generate(settings, {"url": http.url + "/cut.tar.zst"})
    assert_nothing_left(settings)
    http.files["/tiny.tar.zst"] = archive
    assert generate(settings, {"url": http.url + "/tiny.tar.zst"}).images


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "hardlink", "device"])
def test_hostile_archives_are_refused(settings, http, tmp_path, kind):
    http.files["/evil.tar"] = hostile(kind)
    with pytest.raises(ModelSourceError, match=r"^model\.url: archive member .* refused: .*nothing was installed"):
        generate(settings, {"url": http.url + "/evil.tar"})
    assert_nothing_left(settings)
    assert not (tmp_path / "escaped.txt").exists() and not (settings.models_dir / "escaped.txt").exists()
    assert not Path("/tmp/escaped.txt").exists()


def test_archive_caps(settings, http, archive):
    http.files["/tiny.tar.zst"] = archive
    with pytest.raises(ModelSourceError, match=r"more than 3 members"):
        generate(settings.model_copy(update={"max_archive_members": 3}), {"url": http.url + "/tiny.tar.zst"})
    with pytest.raises(ModelSourceError, match=r"extracts to more than 1000 bytes"):
        generate(settings.model_copy(update={"max_archive_bytes": 1000}), {"url": http.url + "/tiny.tar.zst"})
    assert_nothing_left(settings)


def test_request_urls_cannot_reach_private_addresses(settings, http, archive):
    http.files["/tiny.tar.zst"] = archive
    strict = settings.model_copy(update={"allow_private_urls": False})
    with pytest.raises(UserInputError, match=r"^model\.url: host '127\.0\.0\.1' is a private address"):
        generate(strict, {"url": http.url + "/tiny.tar.zst"})
    # The operator's own MODEL_URL is trusted: an internal mirror is a normal setup.
    operator = strict.model_copy(update={"model_url": http.url + "/tiny.tar.zst"})
    assert generate(operator, {}).model.source == "url"


def test_two_workers_fetch_one_model_once(settings, http, archive):
    """Two workers sharing a volume (each with its own fetches in flight) ask for one archive at once."""
    from schemas import ModelSpec
    from worker.sources.cache import DiskCache
    from worker.sources.locate import fetch_archive
    from worker.sources.refs import model_ref

    http.files["/tiny.tar.zst"] = archive
    ref = model_ref(ModelSpec(url=http.url + "/tiny.tar.zst"), settings, "cpu")
    results = at_once(lambda: fetch_archive(ref, settings, DiskCache(settings), lambda event: None)[1])
    assert sorted(results) == ["cache", "url"]
    assert [r for _, r in http.requests].count(f"bytes=0-{2**20 - 1}") == 1  # fetched once


def test_disk_budget_evicts_the_least_recently_used(settings, http, tiny_dir):
    for name in ("a", "b"):
        http.files[f"/{name}.tar"] = pack(tiny_dir, zstd=False)
    budget = settings.model_copy(update={"models_disk_budget_gb": 12 / 1024})  # room for one 8 MB model
    generate(budget, {"url": http.url + "/a.tar"})
    generate(budget, {"url": http.url + "/b.tar"})
    assert [name.split("-")[0] for name in installed(budget)] == ["b"]


def test_cold_start_fetches_the_default_archive_while_torch_imports(tmp_path, http, archive):
    """In a fresh process: the archive is installed before the engine module has finished importing."""
    import subprocess
    import sys

    from tests.helpers import ROOT, worker_env

    http.files["/default.tar.zst"] = archive
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from worker.jobs import JobRunner\n"
        "from worker.settings import Settings\n"
        "runner = JobRunner(Settings(), {})\n"
        "runner.start(warm_up=True)\n"
        "archives = Path(sys.argv[1]) / 'archives'\n"
        "while not (archives.is_dir() and any(archives.iterdir())):\n"
        "    time.sleep(0.005)\n"
        "engine = sys.modules.get('worker.engine')\n"
        "print('engine ready when archive landed:', hasattr(engine, 'Engine'))\n"
        "runner._gpu.submit(lambda: None).result()\n"
        "print('default model loaded:', len(runner.engine().models.loaded()))\n"
    )
    env = worker_env(tmp_path / "models", MODEL_URL=http.url + "/default.tar.zst")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "models")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "engine ready when archive landed: False" in done.stdout
    assert "default model loaded: 1" in done.stdout
    assert [p for p, _ in http.requests].count("/default.tar.zst") == -(-len(archive) // (16 * 2**20))  # once


def test_baked_model_loads_without_network(settings, tmp_path, archive):
    from builder.download import bake

    server = RangeServer({"/tiny.tar.zst": archive})
    url = server.url + "/tiny.tar.zst"
    baked_dir = tmp_path / "image" / "baked"
    bake(settings.model_copy(update={"baked_dir": baked_dir, "model_url": url, "model_id": "acme/tiny"}))
    runtime = settings.model_copy(update={"baked_dir": baked_dir, "model_url": url, "model_id": "acme/tiny",
                                          "models_dir": tmp_path / "empty-volume"})
    from worker.jobs import JobRunner

    asked = len(server.requests)
    JobRunner(runtime, {})._prefetch(None)  # start-up must not fetch what is baked
    assert len(server.requests) == asked
    server.close()  # from here on, any fetch would fail

    result = generate(runtime, {})
    assert (result.model.id, result.model.source) == ("acme/tiny", "baked")
    assert not (tmp_path / "empty-volume" / "archives").exists()
    with pytest.raises(UserInputError, match=r"^model\.url: .*download failed"):  # not baked: needs its source
        generate(runtime, {"url": server.url + "/other.tar.zst"})


def test_lock_files_go_with_their_work(settings, http, archive, tmp_path):
    """MODELS_DIR/.locks kept a file per URL ever fetched: now each goes when its holder lets go,
    after a fetch, a failed fetch or an eviction, and leftovers are swept."""
    http.files["/tiny.tar.zst"] = archive
    generate(settings, {"url": http.url + "/tiny.tar.zst"})
    with pytest.raises(ModelSourceError):
        generate(settings, {"url": http.url + "/missing.tar.zst"})
    locks = settings.models_dir / ".locks"
    assert list(locks.iterdir()) == []
    (locks / "archives--left-by-a-crash.lock").write_text("")
    generate(settings, {"url": http.url + "/tiny.tar.zst#sha256=" + hashlib.sha256(archive).hexdigest()})
    assert list(locks.iterdir()) == []


def test_a_lock_is_held_by_one_at_a_time_while_its_file_comes_and_goes(settings):
    """Holders remove the file; a waiter that got the lock of a removed file takes the new one."""
    from worker.sources.cache import DiskCache

    cache, inside, overlaps = DiskCache(settings), [], []

    def work():
        for _ in range(40):
            with cache.lock("archives", "shared") as held:
                assert held
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.0005)
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [] and not (settings.models_dir / ".locks" / "archives--shared.lock").exists()
    with cache.lock("archives", "held"):
        with cache.lock("archives", "held", wait=False) as second:
            assert second is False  # taken: the second asker is told so, and the file stays
        assert (settings.models_dir / ".locks" / "archives--held.lock").exists()
