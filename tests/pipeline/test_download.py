"""Tests for pipeline.download and pipeline.presets against real local servers.

* HTTP: a threaded ``http.server`` on 127.0.0.1 with Range support that can cut the connection
  after K bytes, ignore Range, or answer with error statuses.
* S3: moto's ``ThreadedMotoServer`` on 127.0.0.1 as a real S3 endpoint for boto3. moto accepts
  any credentials by default; authentication is switched on through its
  ``POST /moto-api/reset-auth`` endpoint (body ``0`` = authenticate every request from now on,
  ``inf`` = off again), after creating an IAM user with an access key and an s3:* policy.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import random
import re
import socket
import stat
import tarfile
import threading
import urllib.request
import uuid
import zipfile
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipeline import download as dl
from pipeline.download import (
    DownloadError,
    Source,
    UnsafeArchiveError,
    download_all,
    fetch,
    safe_extract,
)
from pipeline.presets import PRESETS, preset_names, resolve_preset

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
CUT = 100_000


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# fixtures: environment


@pytest.fixture(autouse=True)
def _local_only_env(monkeypatch, tmp_path):
    """No proxies, no real AWS configuration: every test talks to 127.0.0.1 only."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# --------------------------------------------------------------------------------------------
# fixtures: HTTP server with Range support


class _FileServer:
    """State of the test HTTP server; tweak the attributes between requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict[str, object]] = []
        self.cut_after: int | None = None   # cut the body after this many bytes ...
        self.cuts_left = 0                  # ... on this many upcoming requests
        self.honor_range = True
        self.fail_statuses: list[int] = []  # answer these statuses first, one per request
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    def url(self, path: str) -> str:
        assert self.httpd is not None
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{path.lstrip('/')}"

    @property
    def count(self) -> int:
        return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        state: _FileServer = self.server.state  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        with state.lock:
            record: dict[str, object] = {"path": self.path, "range": rng}
            state.requests.append(record)
            fail = state.fail_statuses.pop(0) if state.fail_statuses else None
            cut = None
            if fail is None and state.cuts_left > 0:
                state.cuts_left -= 1
                cut = state.cut_after
        if fail is not None:
            return self._empty(fail, record)
        data = state.files.get(self.path)
        if data is None:
            return self._empty(404, record)
        start = 0
        status = 200
        headers = {}
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and state.honor_range:
            start = int(m.group(1))
            if start >= len(data):
                return self._empty(416, record, {"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        record["status"] = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes" if state.honor_range else "none")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def _empty(self, status: int, record: dict[str, object], headers: dict[str, str] | None = None):
        record["status"] = status
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def http_server():
    state = _FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    state.httpd = httpd
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# moto S3 server: the moto_endpoint fixture in tests/conftest.py


def _s3_client(endpoint: str, **kwargs):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **kwargs)


def _new_bucket(endpoint: str) -> str:
    name = f"fssd-{uuid.uuid4().hex[:12]}"
    _s3_client(endpoint).create_bucket(Bucket=name)
    return name


def _moto_auth(endpoint: str, count: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
        headers={"Content-Type": "text/plain"},  # a form content type would hide the body
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


@contextmanager
def _moto_auth_enabled(endpoint: str):
    _moto_auth(endpoint, "0")
    try:
        yield
    finally:
        _moto_auth(endpoint, "inf")


# --------------------------------------------------------------------------------------------
# archive helpers


def _add_file(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    tf.addfile(info, io.BytesIO(data))


def _add_special(tf: tarfile.TarFile, name: str, type_: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    tf.addfile(info)


def _make_tar(path: Path, build, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        build(tf)
    return path


def _good_tree(tf: tarfile.TarFile) -> None:
    _add_special(tf, "./", tarfile.DIRTYPE)
    _add_file(tf, "VOCdevkit/VOC2007/Annotations/000001.xml", b"<annotation/>")
    _add_file(tf, "VOCdevkit/VOC2007/JPEGImages/000001.jpg", b"\xff\xd8jpeg")
    _add_file(tf, "VOCdevkit/tool.sh", b"#!/bin/sh\n", mode=0o4755)  # setuid bit gets dropped
    _add_special(tf, "VOCdevkit/latest", tarfile.SYMTYPE, "VOC2007")
    _add_special(tf, "VOCdevkit/copy.xml", tarfile.LNKTYPE,
                 "VOCdevkit/VOC2007/Annotations/000001.xml")


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# --------------------------------------------------------------------------------------------
# Source


def test_source_requires_exactly_one_checksum_for_remote():
    with pytest.raises(ValueError, match=r"https://example\.org/a\.tar.*exactly one of sha256 or md5"):
        Source("https://example.org/a.tar")
    with pytest.raises(ValueError, match="both"):
        Source("s3://bucket/a.tar", sha256="0" * 64, md5="0" * 32)
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        Source("https://example.org/a.tar", sha256="abc")
    with pytest.raises(ValueError, match="unsupported scheme 'ftp'"):
        Source("ftp://example.org/a.tar", md5="0" * 32)
    with pytest.raises(ValueError, match="s3://<bucket>/<key>"):
        Source("s3://bucket-only", md5="0" * 32)
    with pytest.raises(ValueError, match="file:///abs"):
        Source("file://relative/dir/a.tar")
    with pytest.raises(ValueError, match="not a supported archive"):
        Source("https://example.org/a.bin", md5="0" * 32, extract=True)
    with pytest.raises(ValueError, match="extract_to"):
        Source("https://example.org/a.tar", md5="0" * 32, extract=True, extract_to="../up")


def test_source_defaults_and_from_dict(tmp_path):
    s = Source("https://example.org/dir/VOC%20test.tar?x=1", md5="AB" * 16, extract=True)
    assert s.filename == "VOC test.tar"
    assert s.md5 == "ab" * 16 and s.checksum == ("md5", "ab" * 16)
    assert s.is_remote and s.scheme == "https"
    local = Source(str(tmp_path / "x.zip"))  # local files need no checksum
    assert local.filename == "x.zip" and not local.is_remote and local.checksum is None
    assert Source("s3://bkt/some/key.tgz", sha256="1" * 64).filename == "key.tgz"
    built = Source.from_dict({"url": "s3://bkt/k.tar", "sha256": "1" * 64, "extract": True,
                              "mirrors": ["https://m.example/k.tar"]}, where="data.sources[0]")
    assert built.mirrors == ("https://m.example/k.tar",)
    with pytest.raises(ValueError, match=r"data\.sources\[1\]: unknown key\(s\) \['sha1'\]"):
        Source.from_dict({"url": "s3://bkt/k", "sha1": "x"}, where="data.sources[1]")


def test_redact_url_hides_credentials():
    shown = dl.redact_url("https://user:hunter2@h.example/f.tar?X-Amz-Signature=abc&v=1")
    assert "hunter2" not in shown and "abc" not in shown and "v=1" in shown


# --------------------------------------------------------------------------------------------
# HTTP


def test_http_resume_after_cut_connection(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    http_server.cut_after, http_server.cuts_left = CUT, 1
    url = http_server.url("data.bin")
    source = Source(url, sha256=PAYLOAD_SHA256)
    downloads = tmp_path / "downloads"

    with pytest.raises(DownloadError) as info:
        fetch(source, downloads, retries=0, progress=False)
    message = str(info.value)
    assert url in message and "re-run" in message
    part = downloads / "data.bin.part"
    assert part.stat().st_size == CUT
    assert not (downloads / "data.bin").exists()

    path = fetch(source, downloads, retries=0, progress=False)
    assert http_server.requests[1]["range"] == f"bytes={CUT}-"
    assert http_server.requests[1]["status"] == 206
    assert path == downloads / "data.bin" and path.read_bytes() == PAYLOAD
    assert not part.exists()
    stamp = json.loads((downloads / "data.bin.verified").read_text())
    assert stamp["digest"] == PAYLOAD_SHA256 and stamp["size"] == len(PAYLOAD)


def test_http_retries_within_one_call_and_shows_progress(http_server, tmp_path, capsys):
    http_server.files["/data.bin"] = PAYLOAD
    http_server.cut_after, http_server.cuts_left = CUT, 1
    http_server.fail_statuses = [503]
    source = Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256)
    path = fetch(source, tmp_path, retries=3, backoff=0.0, progress=True)
    assert path.read_bytes() == PAYLOAD
    assert [r["status"] for r in http_server.requests] == [503, 200, 206]
    assert http_server.requests[2]["range"] == f"bytes={CUT}-"


def test_http_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    http_server.honor_range = False
    http_server.cut_after, http_server.cuts_left = CUT, 1
    source = Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256)
    with pytest.raises(DownloadError):
        fetch(source, tmp_path, retries=0, progress=False)
    path = fetch(source, tmp_path, retries=0, progress=False)
    assert http_server.requests[1]["range"] == f"bytes={CUT}-"
    assert http_server.requests[1]["status"] == 200
    assert path.read_bytes() == PAYLOAD


def test_http_416_complete_part_is_verified_not_refetched(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)  # e.g. killed right before the rename
    path = fetch(Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256), tmp_path,
                 retries=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in http_server.requests] == [
        (f"bytes={len(PAYLOAD)}-", 416)]


def test_http_416_bad_part_is_downloaded_again(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").write_bytes(b"\0" * len(PAYLOAD))
    path = fetch(Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256), tmp_path,
                 retries=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [(r["range"], r["status"]) for r in http_server.requests] == [
        (f"bytes={len(PAYLOAD)}-", 416), (None, 200)]


def test_http_checksum_mismatch_leaves_nothing_trusted(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    url = http_server.url("data.bin")
    wrong = sha256(b"something else")
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        fetch(Source(url, sha256=wrong), tmp_path, retries=0, progress=False)
    assert url in str(info.value) and wrong in str(info.value) and PAYLOAD_SHA256 in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no file, no .part, no stamp
    # a later run with the right checksum downloads from scratch
    path = fetch(Source(url, sha256=PAYLOAD_SHA256), tmp_path, retries=0, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert http_server.requests[1]["range"] is None


def test_http_verified_file_is_not_fetched_again(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    source = Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256)
    path = fetch(source, tmp_path, progress=False)
    assert http_server.count == 1
    assert fetch(source, tmp_path, progress=False) == path
    assert http_server.count == 1
    # a touched file is re-hashed (still good: no request), and the stamp is refreshed
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    fetch(source, tmp_path, progress=False)
    assert http_server.count == 1
    assert json.loads((tmp_path / "data.bin.verified").read_text())["mtime_ns"] == path.stat().st_mtime_ns
    # a corrupted file (same size) is fetched again
    path.write_bytes(b"\1" * len(PAYLOAD))
    fetch(source, tmp_path, progress=False)
    assert http_server.count == 2 and path.read_bytes() == PAYLOAD


def test_http_404_names_the_url(http_server, tmp_path):
    url = http_server.url("missing.tar")
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(Source(url, md5="0" * 32), tmp_path, retries=3, backoff=0.0, progress=False)
    assert url in str(info.value) and "Check the URL" in str(info.value)
    assert http_server.count == 1  # 4xx is not retried
    assert list(tmp_path.iterdir()) == []


def test_http_5xx_exhausts_retries(http_server, tmp_path):
    http_server.files["/data.bin"] = PAYLOAD
    http_server.fail_statuses = [500, 502, 503]
    with pytest.raises(DownloadError, match=r"HTTP 503.*3 attempts"):
        fetch(Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256), tmp_path,
              retries=2, backoff=0.0, progress=False)
    assert http_server.count == 3


def test_http_connection_refused(tmp_path, free_port):
    url = f"http://127.0.0.1:{free_port()}/data.bin"
    with pytest.raises(DownloadError, match="connection refused") as info:
        fetch(Source(url, sha256=PAYLOAD_SHA256), tmp_path, retries=1, backoff=0.01,
              progress=False)
    assert url in str(info.value) and "2 attempts" in str(info.value)


def test_http_credentials_never_in_messages(http_server, tmp_path):
    port = http_server.httpd.server_address[1]
    url = f"http://alice:hunter2@127.0.0.1:{port}/missing.tar?token=s3cr3t"
    with pytest.raises(DownloadError) as info:
        fetch(Source(url, md5="0" * 32, filename="m.tar"), tmp_path, retries=0, progress=False)
    assert "hunter2" not in str(info.value) and "s3cr3t" not in str(info.value)


def test_http_mirror_used_when_main_url_fails(http_server, tmp_path):
    http_server.files["/mirror/data.bin"] = PAYLOAD
    source = Source(http_server.url("gone/data.bin"), sha256=PAYLOAD_SHA256,
                    mirrors=(http_server.url("mirror/data.bin"),))
    assert fetch(source, tmp_path, retries=0, progress=False).read_bytes() == PAYLOAD
    assert [r["status"] for r in http_server.requests] == [404, 200]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_http_no_space_left(http_server, tmp_path):
    """Writes to /dev/full fail with a real ENOSPC from the kernel."""
    http_server.files["/data.bin"] = PAYLOAD
    (tmp_path / "data.bin.part").symlink_to("/dev/full")
    with pytest.raises(DownloadError, match="no space left") as info:
        fetch(Source(http_server.url("data.bin"), sha256=PAYLOAD_SHA256), tmp_path,
              retries=3, backoff=0.0, progress=False)
    assert http_server.url("data.bin") in str(info.value) and "data.root" in str(info.value)
    assert http_server.count == 1  # a full disk is not retried
    assert not (tmp_path / "data.bin").exists()


def test_download_all_http_and_extract(http_server, tmp_path):
    archive = _make_tar(tmp_path / "voc.tar.gz", _good_tree, "w:gz").read_bytes()
    http_server.files["/voc.tar.gz"] = archive
    http_server.files["/labels.txt"] = b"cat\ndog\n"
    sources = [
        Source(http_server.url("voc.tar.gz"), sha256=sha256(archive), extract=True),
        Source(http_server.url("labels.txt"), md5=hashlib.md5(b"cat\ndog\n").hexdigest(),
               extract=False),
    ]
    raw = tmp_path / "raw"
    paths = download_all(sources, tmp_path / "downloads", raw, retries=0, progress=False)
    assert [p.name for p in paths] == ["voc.tar.gz", "labels.txt"]
    assert (raw / "VOCdevkit/VOC2007/JPEGImages/000001.jpg").read_bytes() == b"\xff\xd8jpeg"
    assert not (raw / "labels.txt").exists()
    before = http_server.count
    download_all(sources, tmp_path / "downloads", raw, retries=0, progress=False)
    assert http_server.count == before
    with pytest.raises(ValueError, match="both be saved as 'labels.txt'"):
        download_all([sources[1], sources[1]], tmp_path / "d2", raw)


# --------------------------------------------------------------------------------------------
# local files


def test_local_copy_plain_path_and_file_url(tmp_path):
    src = tmp_path / "src" / "data.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    downloads = tmp_path / "downloads"
    path = fetch(Source(str(src)), downloads, progress=False)  # no checksum needed
    assert path.read_bytes() == PAYLOAD
    stamp = json.loads((downloads / "data.bin.verified").read_text())
    assert stamp["digest"] == PAYLOAD_SHA256
    mtime = path.stat().st_mtime_ns
    assert fetch(Source(str(src)), downloads, progress=False).stat().st_mtime_ns == mtime  # no copy
    path2 = fetch(Source(src.as_uri(), sha256=PAYLOAD_SHA256, filename="b.bin"), downloads,
                  progress=False)
    assert path2.read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(Source(src.as_uri(), sha256="0" * 64, filename="c.bin"), downloads, progress=False)
    assert not (downloads / "c.bin").exists() and not (downloads / "c.bin.part").exists()
    assert src.read_bytes() == PAYLOAD  # the source is never touched
    with pytest.raises(DownloadError, match="no such file"):
        fetch(Source(str(tmp_path / "nope.tar")), downloads, progress=False)


# --------------------------------------------------------------------------------------------
# S3 through moto


def test_s3_fetch_and_extract(moto_endpoint, tmp_path, monkeypatch):
    archive = _make_tar(tmp_path / "scenes.tar.gz", _good_tree, "w:gz").read_bytes()
    bucket = _new_bucket(moto_endpoint)
    _s3_client(moto_endpoint).put_object(Bucket=bucket, Key="datasets/scenes.tar.gz", Body=archive)
    source = Source(f"s3://{bucket}/datasets/scenes.tar.gz", sha256=sha256(archive),
                    extract=True, extract_to="scenes")
    raw = tmp_path / "raw"
    [path] = download_all([source], tmp_path / "downloads", raw, s3_endpoint_url=moto_endpoint,
                          retries=0, progress=False)
    assert path.read_bytes() == archive
    assert (raw / "scenes/VOCdevkit/VOC2007/Annotations/000001.xml").read_bytes() == b"<annotation/>"
    assert not (tmp_path / "downloads" / "scenes.tar.gz.part").exists()

    # endpoint from AWS_ENDPOINT_URL, credentials from a named profile
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    credentials = tmp_path / "credentials"
    credentials.write_text("[fssd-test]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    path2 = fetch(source, tmp_path / "downloads2", s3_profile="fssd-test", retries=0, progress=False)
    assert path2.read_bytes() == archive
    with pytest.raises(DownloadError, match="profile 'nobody' was not found"):
        fetch(source, tmp_path / "downloads3", s3_profile="nobody", retries=0, progress=False)


def test_s3_missing_bucket_and_key(moto_endpoint, tmp_path):
    bucket = _new_bucket(moto_endpoint)
    url = f"s3://{bucket}/no/such/key.tar"
    with pytest.raises(DownloadError, match="NoSuchKey") as info:
        fetch(Source(url, md5="0" * 32), tmp_path, s3_endpoint_url=moto_endpoint, retries=0,
              progress=False)
    assert url in str(info.value) and "'no/such/key.tar'" in str(info.value)
    url = "s3://fssd-no-such-bucket/key.tar"
    with pytest.raises(DownloadError, match="NoSuchBucket") as info:
        fetch(Source(url, md5="0" * 32), tmp_path, s3_endpoint_url=moto_endpoint, retries=0,
              progress=False)
    assert url in str(info.value) and "bucket 'fssd-no-such-bucket' does not exist" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_s3_checksum_mismatch(moto_endpoint, tmp_path):
    bucket = _new_bucket(moto_endpoint)
    _s3_client(moto_endpoint).put_object(Bucket=bucket, Key="a.bin", Body=PAYLOAD)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(Source(f"s3://{bucket}/a.bin", sha256="0" * 64), tmp_path,
              s3_endpoint_url=moto_endpoint, retries=0, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_s3_wrong_credentials(moto_endpoint, tmp_path, monkeypatch):
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_endpoint, region_name="us-east-1")
    user = f"fssd-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = iam.create_policy(
        PolicyName=f"{user}-s3",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}),
    )
    iam.attach_user_policy(UserName=user, PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName=user)["AccessKey"]
    bucket = _new_bucket(moto_endpoint)
    _s3_client(moto_endpoint).put_object(Bucket=bucket, Key="a.bin", Body=PAYLOAD)
    source = Source(f"s3://{bucket}/a.bin", sha256=PAYLOAD_SHA256)

    with _moto_auth_enabled(moto_endpoint):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        assert fetch(source, tmp_path / "ok", s3_endpoint_url=moto_endpoint, retries=0,
                     progress=False).read_bytes() == PAYLOAD

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-1")
        with pytest.raises(DownloadError, match="InvalidAccessKeyId") as info:
            fetch(source, tmp_path / "bad", s3_endpoint_url=moto_endpoint, retries=0,
                  progress=False)
        assert source.url in str(info.value) and "not-the-secret-1" not in str(info.value)

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-2")
        with pytest.raises(DownloadError, match="SignatureDoesNotMatch") as info:
            fetch(source, tmp_path / "bad", s3_endpoint_url=moto_endpoint, retries=0,
                  progress=False)
        assert "not-the-secret-2" not in str(info.value)
        assert key["SecretAccessKey"] not in str(info.value)
    assert list((tmp_path / "bad").iterdir()) == []


def test_s3_endpoint_unreachable(tmp_path, free_port):
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DownloadError, match="cannot reach the S3 endpoint") as info:
        fetch(Source("s3://bkt-name/a.bin", sha256=PAYLOAD_SHA256), tmp_path,
              s3_endpoint_url=endpoint, retries=0, timeout=5, progress=False)
    assert endpoint in str(info.value)


# --------------------------------------------------------------------------------------------
# safe_extract


@pytest.mark.parametrize("suffix,mode", [
    (".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz"), (".tar.bz2", "w:bz2"),
    (".tar.xz", "w:xz"),
])
def test_safe_extract_tar_formats(tmp_path, suffix, mode):
    archive = _make_tar(tmp_path / f"a{suffix}", _good_tree, mode)
    dest = tmp_path / "out"
    files = safe_extract(archive, dest)
    assert sorted(str(p.relative_to(dest)) for p in files) == sorted([
        "VOCdevkit/VOC2007/Annotations/000001.xml", "VOCdevkit/VOC2007/JPEGImages/000001.jpg",
        "VOCdevkit/tool.sh", "VOCdevkit/latest", "VOCdevkit/copy.xml"])
    assert (dest / "VOCdevkit/latest").is_symlink()
    assert (dest / "VOCdevkit/latest/Annotations/000001.xml").read_bytes() == b"<annotation/>"
    assert (dest / "VOCdevkit/copy.xml").read_bytes() == b"<annotation/>"
    assert not (dest / "VOCdevkit/tool.sh").stat().st_mode & stat.S_ISUID
    assert [p.name for p in tmp_path.iterdir() if ".extract-" in p.name] == []


def test_safe_extract_without_data_filter(tmp_path, monkeypatch):
    """The code path for Pythons without tarfile extraction filters."""
    monkeypatch.setattr(dl, "_HAS_DATA_FILTER", False)
    archive = _make_tar(tmp_path / "a.tar", _good_tree)
    dest = tmp_path / "out"
    safe_extract(archive, dest)
    assert not (dest / "VOCdevkit/tool.sh").stat().st_mode & stat.S_ISUID
    assert (dest / "VOCdevkit/latest/JPEGImages/000001.jpg").exists()


def test_safe_extract_zip_and_skip_when_stamped(tmp_path):
    archive = tmp_path / "coco.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations/instances_val2017.json", b"{}")
        zf.writestr("val2017/000000000139.jpg", b"jpeg")
    dest = tmp_path / "raw" / "coco"
    files = safe_extract(archive, dest)
    assert {str(p.relative_to(dest)) for p in files} == {
        "annotations/instances_val2017.json", "val2017/000000000139.jpg"}
    # same archive again: not re-extracted (a local edit survives)
    (dest / "annotations/instances_val2017.json").write_bytes(b"edited")
    assert safe_extract(archive, dest) == files
    assert (dest / "annotations/instances_val2017.json").read_bytes() == b"edited"
    # a changed archive is extracted again, merging into the existing tree
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("annotations/instances_val2017.json", b'{"v": 2}')
    os.utime(archive, ns=(0, archive.stat().st_mtime_ns + 10_000_000_000))
    safe_extract(archive, dest)
    assert (dest / "annotations/instances_val2017.json").read_bytes() == b'{"v": 2}'
    assert (dest / "val2017/000000000139.jpg").exists()
    # a deleted file triggers re-extraction too
    (dest / "annotations/instances_val2017.json").unlink()
    safe_extract(archive, dest)
    assert (dest / "annotations/instances_val2017.json").exists()


def _dotdot(tf):
    _add_file(tf, "good.txt", b"ok")
    _add_file(tf, "../evil.txt", b"evil")


def _absolute(tf):
    _add_file(tf, "good.txt", b"ok")
    _add_file(tf, "/tmp/fssd-absolute-evil.txt", b"evil")


def _symlink_etc(tf):
    _add_file(tf, "good.txt", b"ok")
    _add_special(tf, "etc", tarfile.SYMTYPE, "/etc")
    _add_file(tf, "etc/fssd-evil.txt", b"evil")


def _symlink_relative_out(tf):
    _add_special(tf, "sub/", tarfile.DIRTYPE)
    _add_special(tf, "sub/up", tarfile.SYMTYPE, "../../outside")


def _symlink_chain(tf):  # each link alone looks inside; together they escape
    _add_special(tf, "a/", tarfile.DIRTYPE)
    _add_special(tf, "a/b", tarfile.SYMTYPE, ".")
    _add_special(tf, "c", tarfile.SYMTYPE, "a/b/../..")
    _add_file(tf, "c/evil.txt", b"evil")


def _hardlink_out(tf):
    _add_file(tf, "good.txt", b"ok")
    _add_special(tf, "passwd", tarfile.LNKTYPE, "../../etc/passwd")


def _fifo(tf):
    _add_file(tf, "good.txt", b"ok")
    _add_special(tf, "pipe", tarfile.FIFOTYPE)


def _device(tf):
    _add_special(tf, "null", tarfile.CHRTYPE)


@pytest.mark.parametrize("build,entry", [
    (_dotdot, "../evil.txt"),
    (_absolute, "/tmp/fssd-absolute-evil.txt"),
    (_symlink_etc, "etc"),
    (_symlink_relative_out, "sub/up"),
    (_symlink_chain, "c"),
    (_hardlink_out, "passwd"),
    (_fifo, "pipe"),
    (_device, "null"),
])
def test_safe_extract_refuses_unsafe_tar(tmp_path, build, entry):
    work = tmp_path / "work"
    work.mkdir()
    archive = _make_tar(tmp_path / "bad.tar", build)
    dest = work / "out"
    with pytest.raises(UnsafeArchiveError) as info:
        safe_extract(archive, dest)
    assert str(archive) in str(info.value) and repr(entry) in str(info.value)
    assert _listing(work) == []  # nothing at all: no dest, no staging directory
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside").exists()
    assert not os.path.exists("/tmp/fssd-absolute-evil.txt")


def test_safe_extract_refuses_unsafe_zip(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.txt", b"ok")
        zf.writestr("../evil.txt", b"evil")
    with pytest.raises(UnsafeArchiveError, match=r"bad\.zip.*'\.\./evil\.txt'"):
        safe_extract(archive, work / "out")
    assert _listing(work) == [] and not (tmp_path / "evil.txt").exists()


def test_safe_extract_rejects_unknown_and_corrupt(tmp_path):
    with pytest.raises(ValueError, match="unsupported archive type"):
        safe_extract(tmp_path / "a.rar", tmp_path / "out")
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(gzip.compress(b"not a tar at all" * 100)[:50])
    with pytest.raises(ValueError, match="corrupt"):
        safe_extract(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_safe_extract_reports_missing_space(tmp_path, monkeypatch):
    archive = _make_tar(tmp_path / "a.tar", _good_tree)

    class _Usage:
        free = 10

    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _path: _Usage)
    with pytest.raises(OSError) as info:
        safe_extract(archive, tmp_path / "out")
    assert info.value.errno == errno.ENOSPC and "a.tar" in str(info.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# presets


def test_presets_have_official_urls_and_checksums():
    assert preset_names() == ["coco2017", "voc0712", "voc2007", "voc2012"]
    md5 = {s.filename: s.md5 for sources in PRESETS.values() for s in sources}
    assert md5 == {
        "VOCtrainval_06-Nov-2007.tar": "c52e279531787c972589f7e41ab4ae64",
        "VOCtest_06-Nov-2007.tar": "b6e924de25625d8de591ea690078ad9f",
        "VOCtrainval_11-May-2012.tar": "6cd6e144f989b92b3379bac3b3de84fd",
        "train2017.zip": "cced6f7f71b7629ddf16f17bbcfab6b2",
        "val2017.zip": "442b8da7639aecaf257c1dceb8ba8c80",
        "annotations_trainval2017.zip": "f4bbac642086de4f52a3fdda2de5fa2c",
    }
    voc0712 = resolve_preset("voc0712")
    assert [s.filename for s in voc0712] == [
        "VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar", "VOCtrainval_11-May-2012.tar"]
    assert all(s.url.startswith("https://thor.robots.ox.ac.uk/pascal/VOC/voc20") for s in voc0712)
    assert all(s.mirrors[0].startswith("http://host.robots.ox.ac.uk/pascal/VOC/voc20")
               and s.mirrors[0].endswith(s.filename) for s in voc0712)
    assert all(s.extract and s.extract_to is None for s in voc0712)
    coco = resolve_preset("coco2017")
    assert all(s.url.startswith("http://images.cocodataset.org/") and s.extract_to == "coco"
               for s in coco)
    resolve_preset("voc2007").append(coco[0])  # a copy: the preset itself is unchanged
    assert len(resolve_preset("voc2007")) == 2
    with pytest.raises(ValueError, match="unknown dataset preset 'voc2010'.*voc0712"):
        resolve_preset("voc2010")


def test_synthetic_archive_is_named_by_its_scene_knobs(tmp_path):
    """Same knobs: the archive is reused. Changed knobs: a new archive, and raw/ holds the new scenes."""
    easy = {"objects_per_image": (1, 2), "object_size_range": (0.3, 0.5), "max_occlusion": 0.2}
    busy = {**easy, "objects_per_image": (5, 6)}
    first = dl.run_download(dataset="synthetic", data_root=tmp_path, synthetic_images=10, synthetic_scenes=easy)
    archive = Path(first["files"][0])
    stamp = archive.stat().st_mtime_ns
    again = dl.run_download(dataset="synthetic", data_root=tmp_path, synthetic_images=10, synthetic_scenes=easy)
    assert again["files"] == first["files"] and archive.stat().st_mtime_ns == stamp

    def objects() -> int:
        return sum(p.read_text().count("<object>") for p in (tmp_path / "raw" / "synthetic" / "Annotations").glob("*.xml"))

    assert objects() <= 20
    other = dl.run_download(dataset="synthetic", data_root=tmp_path, synthetic_images=10, synthetic_scenes=busy)
    assert other["files"] != first["files"] and archive.is_file()
    assert objects() > 20  # at least one image got more than the easy set's two shapes
