"""Fetch, verify and safely extract the pipeline's raw data.

This is library code for the ``download`` stage: every function takes explicit, typed arguments
(no params.yaml, no CLI). The pieces:

* :class:`Source` describes one file to fetch: where from (``http(s)://``, ``s3://``, ``file://``
  or a plain path), how to verify it (exactly one of ``sha256``/``md5`` for remote sources), and
  whether to extract it.
* :func:`fetch` brings one source into the downloads directory, verified:

  - http(s) is streamed into ``<downloads>/<filename>.part``. An interrupted transfer is resumed by
    the next call with ``Range: bytes=N-`` (a server that ignores ranges and answers 200 restarts
    from byte 0; 416 means the partial file is already complete, or bad, and it is verified).
    Connection errors, timeouts and 5xx answers are retried with exponential backoff.
  - ``s3://bucket/key`` goes through boto3's managed (multipart, multi-threaded) transfer, with
    credentials from the environment or an AWS profile and an optional custom endpoint.
  - ``file://`` URLs and plain paths are copied (a checksum is optional for local files).

  The finished file is checked against its checksum and only then renamed into place with
  :func:`os.replace`, so a file under its final name has always been verified. A small
  ``<file>.verified`` stamp records the digest together with the file's size and mtime, so a
  repeated run does not re-hash a multi-gigabyte archive; the file is hashed again whenever its
  size or mtime changed.
* :func:`safe_extract` unpacks .tar/.tar.gz/.tgz/.tar.bz2/.tar.xz/.zip archives after checking
  *every* entry (no absolute paths, no ``..``, no links that resolve outside the destination, no
  device files or FIFOs) into a temporary directory beside the destination, then moves the tree
  into place. A stamp in the destination makes a repeated extraction of the same archive a no-op.
* :func:`download_all` fetches a list of sources and extracts those marked ``extract=True``.

Every failure ends in :class:`DownloadError` (a ``RuntimeError``), :class:`UnsafeArchiveError`
(a ``ValueError``), an ``InputError`` (a ``ValueError``: a bad source, a corrupt archive) or
:class:`NoSpaceError` (an ``OSError``), all :class:`pipeline.errors.UserError`, whose message names
the source or archive, says what went wrong and what to do.
Credentials never appear in messages: user-info and secret-looking query parameters are removed
from URLs before they are shown, and S3 errors are reported by their error code only.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import InputError, UserError

__all__ = [
    "ARCHIVE_SUFFIXES",
    "DownloadError",
    "NoSpaceError",
    "Source",
    "UnsafeArchiveError",
    "download_all",
    "fetch",
    "hash_file",
    "redact_url",
    "safe_extract",
]

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
"""Bytes read/written per step when streaming, copying and hashing."""

PART_SUFFIX = ".part"
"""Suffix of the file a transfer writes into before it is verified and renamed."""

STAMP_SUFFIX = ".verified"
"""Suffix of the JSON stamp that records a verified file's digest, size and mtime."""

ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz", ".zip",
)
"""File name endings that :func:`safe_extract` understands."""

_ALLOWED_SCHEMES = ("http", "https", "s3", "file")
_REMOTE_SCHEMES = ("http", "https", "s3")
_DIGEST_LENGTHS = {"sha256": 64, "md5": 32}
_HEX_RE = re.compile(r"[0-9a-f]+")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SECRET_QUERY_KEY_RE = re.compile(
    r"sig|signature|token|credential|secret|password|passwd|pwd|auth|key", re.IGNORECASE
)
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE_RE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)
_MAX_BACKOFF_S = 60.0
_USER_AGENT = "fssd-pipeline-download/1 (+urllib)"
_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")  # Python >= 3.12, and 3.10.12+/3.11.4+
_EXTRACT_STAMP_PREFIX = ".extracted-"
_MAX_LINK_HOPS = 40
_S3_MULTIPART_BYTES = 64 << 20


# --------------------------------------------------------------------------------------------
# errors and small helpers


class DownloadError(UserError, RuntimeError):
    """A source could not be fetched or verified.

    The message names the (redacted) source URL, the reason and the fix. ``url`` holds the
    redacted URL for programmatic use.
    """

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self._fatal = False  # True: local problem (e.g. disk full); trying a mirror won't help

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``url`` across pickling (Ray, multiprocessing)
        return (type(self), (self.args[0], self.url))


class UnsafeArchiveError(UserError, ValueError):
    """An archive holds an entry that could write outside the destination (or a device/FIFO).

    Raised before anything is written; the message names the archive and the offending entry.
    """


class NoSpaceError(UserError, OSError):
    """Not enough free space to extract an archive (``errno.ENOSPC``); nothing was written."""


class _Retryable(Exception):
    """Internal: a transient transport failure (connection lost, timeout, 5xx)."""


class _RangeNotSatisfiable(Exception):
    """Internal: the server answered 416 to our ``Range`` request."""

    def __init__(self, total: int | None) -> None:
        super().__init__(total)
        self.total = total


def redact_url(url: str) -> str:
    """Return ``url`` fit for messages and logs: no user-info, no secret query values.

    ``https://user:pw@host/f?X-Amz-Signature=abc&v=1`` becomes
    ``https://***@host/f?X-Amz-Signature=***&v=1``. Plain paths are returned unchanged.
    """
    if _url_scheme(url) == "":
        return url
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode(
            [(k, "***" if _SECRET_QUERY_KEY_RE.search(k) else v) for k, v in pairs], safe="*"
        )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _url_scheme(url: str) -> str:
    """The lower-case scheme of ``url``; ``""`` for plain paths (including ``C:\\...``)."""
    if _DRIVE_RE.match(url):
        return ""
    try:
        return urllib.parse.urlsplit(url).scheme.lower()
    except ValueError:
        return "?"


def _check_url(url: str) -> str:
    """Validate ``url`` (scheme and shape) and return its scheme; ``ValueError`` otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise InputError(f"source url must be a non-empty string, got {url!r}")
    shown = redact_url(url)
    scheme = _url_scheme(url)
    if scheme not in (*_ALLOWED_SCHEMES, ""):
        raise InputError(
            f"source url {shown!r}: unsupported scheme {scheme!r}; use http://, https://, s3://, "
            "file:// or a plain file path"
        )
    parts = urllib.parse.urlsplit(url) if scheme else None
    if scheme in ("http", "https") and not parts.hostname:  # type: ignore[union-attr]
        raise InputError(f"source url {shown!r}: no host name")
    if scheme == "s3":
        bucket, key = parts.netloc, parts.path.lstrip("/")  # type: ignore[union-attr]
        if not bucket or not key or key.endswith("/"):
            raise InputError(
                f"source url {shown!r}: expected s3://<bucket>/<key> naming one object"
            )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):  # type: ignore[union-attr]
            raise InputError(
                f"source url {shown!r}: file URLs must be absolute (file:///abs/path/file); "
                "for a path relative to the working directory write it without 'file://'"
            )
        if not parts.path:  # type: ignore[union-attr]
            raise InputError(f"source url {shown!r}: no path")
    return scheme


def _archive_kind(name: str) -> str | None:
    """``"zip"``, ``"tar"`` or ``None`` from a file name's ending."""
    lower = name.lower()
    if lower.endswith(".zip"):
        return "zip"
    if any(lower.endswith(s) for s in ARCHIVE_SUFFIXES):
        return "tar"
    return None


def _new_hasher(algorithm: str) -> Any:
    # md5 only checks integrity here; usedforsecurity=False keeps it usable on FIPS systems.
    return hashlib.new(algorithm, usedforsecurity=False)


def hash_file(path: Path, algorithm: str = "sha256", *, progress: bool = False) -> str:
    """Return the hex digest of ``path`` (``algorithm``: ``"sha256"`` or ``"md5"``)."""
    hasher = _new_hasher(algorithm)
    path = Path(path)
    with _progress_bar(path.stat().st_size, 0, f"verify {path.name}", progress) as bar:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                hasher.update(chunk)
                bar.update(len(chunk))
    return hasher.hexdigest()


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _progress_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm byte counter on stderr; disabled (a no-op) unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
        disable=not enabled, file=sys.stderr, delay=0.5, leave=False, dynamic_ncols=True,
    )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        _unlink_quiet(tmp)


def _unlink_quiet(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _human(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


# --------------------------------------------------------------------------------------------
# Source


@dataclass(frozen=True)
class Source:
    """One file to fetch (and optionally extract).

    Args:
        url: ``http://``, ``https://``, ``s3://bucket/key``, ``file:///abs/path`` or a plain path
            (relative paths are resolved against the working directory).
        sha256: expected SHA-256 (64 hex digits).
        md5: expected MD5 (32 hex digits). Remote sources (http, https, s3) need exactly one of
            ``sha256``/``md5``; local files may give one or none.
        extract: extract the file with :func:`safe_extract` in :func:`download_all`; the file
            name must end in one of :data:`ARCHIVE_SUFFIXES`.
        filename: name of the file in the downloads directory; default: the URL's basename.
        extract_to: sub-directory of the raw directory to extract into (relative, no ``..``);
            default: the raw directory itself.
        mirrors: further URLs serving the same bytes, tried in order when ``url`` fails.

    Raises:
        ValueError: naming the URL, for a bad scheme, a missing/duplicate/malformed checksum,
            an unusable file name or ``extract_to``.
    """

    url: str
    sha256: str | None = None
    md5: str | None = None
    extract: bool = False
    filename: str | None = None
    extract_to: str | None = None
    mirrors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        scheme = _check_url(self.url)
        shown = redact_url(self.url)
        if isinstance(self.mirrors, str):
            raise InputError(f"source {shown!r}: mirrors must be a list of URLs, not a string")
        mirrors = tuple(self.mirrors)
        for mirror in mirrors:
            _check_url(mirror)
        object.__setattr__(self, "mirrors", mirrors)

        for algorithm, length in _DIGEST_LENGTHS.items():
            value = getattr(self, algorithm)
            if value is None:
                continue
            if not isinstance(value, str):
                raise InputError(f"source {shown!r}: {algorithm} must be a hex string, got {value!r}")
            value = value.strip().lower()
            if len(value) != length or not _HEX_RE.fullmatch(value):
                raise InputError(
                    f"source {shown!r}: {algorithm} must be {length} hexadecimal digits, "
                    f"got {value!r}"
                )
            object.__setattr__(self, algorithm, value)

        given = [a for a in _DIGEST_LENGTHS if getattr(self, a) is not None]
        remote = scheme in _REMOTE_SCHEMES or any(_url_scheme(m) in _REMOTE_SCHEMES for m in mirrors)
        if remote and len(given) != 1:
            raise InputError(
                f"source {shown!r}: give exactly one of sha256 or md5 "
                f"(got {'both' if given else 'neither'}); remote downloads are verified by "
                "checksum. Compute it from a trusted copy with `sha256sum FILE`."
            )
        if len(given) > 1:
            raise InputError(f"source {shown!r}: give at most one of sha256 or md5, not both")

        if not isinstance(self.extract, bool):
            raise InputError(f"source {shown!r}: extract must be true or false, got {self.extract!r}")

        filename = self.filename
        if filename is None:
            path = urllib.parse.urlsplit(self.url).path if scheme else self.url
            filename = urllib.parse.unquote(path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1])
        if (
            not isinstance(filename, str) or filename in ("", ".", "..")
            or "/" in filename or "\\" in filename or "\x00" in filename
        ):
            raise InputError(
                f"source {shown!r}: cannot use {filename!r} as the file name in the downloads "
                "directory; set `filename` to a plain name such as 'data.tar.gz'"
            )
        if filename.endswith((PART_SUFFIX, STAMP_SUFFIX)):
            raise InputError(
                f"source {shown!r}: file name {filename!r} ends in a suffix reserved for "
                f"partial downloads/stamps ({PART_SUFFIX}, {STAMP_SUFFIX}); choose another"
            )
        object.__setattr__(self, "filename", filename)

        if self.extract and _archive_kind(filename) is None:
            raise InputError(
                f"source {shown!r}: extract is true but {filename!r} is not a supported archive "
                f"({', '.join(ARCHIVE_SUFFIXES)}); set `filename` with the right ending or "
                "set extract to false"
            )
        if self.extract_to is not None:
            sub = self.extract_to
            parts = sub.replace("\\", "/").split("/") if isinstance(sub, str) else None
            if (
                not parts or not sub.strip() or sub.startswith(("/", "\\"))
                or _DRIVE_RE.match(sub) or ".." in parts
            ):
                raise InputError(
                    f"source {shown!r}: extract_to must be a relative sub-directory without "
                    f"'..', got {sub!r}"
                )

    @property
    def scheme(self) -> str:
        """``"http"``, ``"https"``, ``"s3"``, ``"file"`` or ``""`` (plain path)."""
        return _url_scheme(self.url)

    @property
    def is_remote(self) -> bool:
        """True for http, https and s3 sources."""
        return self.scheme in _REMOTE_SCHEMES

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, hex digest)`` or ``None`` when no checksum was given."""
        if self.sha256 is not None:
            return ("sha256", self.sha256)
        if self.md5 is not None:
            return ("md5", self.md5)
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "source") -> Source:
        """Build a Source from a mapping (e.g. one entry of ``data.sources``).

        Unknown keys and a missing ``url`` raise ``ValueError`` naming ``where`` (a dotted
        path such as ``"data.sources[0]"``); a list of mirrors is accepted.
        """
        if not isinstance(data, Mapping):
            raise InputError(f"{where}: expected a mapping with at least 'url', got {data!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; allowed keys: {allowed}")
        if "url" not in data:
            raise InputError(f"{where}: missing required key 'url'")
        kwargs = dict(data)
        if isinstance(kwargs.get("mirrors"), list):
            kwargs["mirrors"] = tuple(kwargs["mirrors"])
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------------------------
# verification stamps


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + STAMP_SUFFIX)


def _write_stamp(target: Path, algorithm: str, digest: str, **extra: Any) -> None:
    st = target.stat()
    record = {
        "algorithm": algorithm, "digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        **extra,
    }
    _atomic_write_text(_stamp_path(target), json.dumps(record, sort_keys=True) + "\n")


def _read_stamp(target: Path) -> dict[str, Any] | None:
    """The stamp of ``target`` if it still describes the file on disk (same size and mtime)."""
    try:
        record = json.loads(_stamp_path(target).read_text(encoding="utf-8"))
        st = target.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    return record


def _verified_in_place(target: Path, checksum: tuple[str, str], progress: bool) -> bool:
    """True when ``target`` exists and matches ``checksum`` (stamp fast path, else re-hash)."""
    if not target.is_file():
        return False
    algorithm, expected = checksum
    stamp = _read_stamp(target)
    if stamp and stamp.get("algorithm") == algorithm and stamp.get("digest") == expected:
        log.debug("%s: verified earlier (stamp matches size and mtime)", target)
        return True
    actual = hash_file(target, algorithm, progress=progress)
    if actual == expected:
        _write_stamp(target, algorithm, actual)
        return True
    log.warning(
        "%s does not match the expected %s %s (it has %s); fetching it again",
        target, algorithm, expected, actual,
    )
    _unlink_quiet(_stamp_path(target))
    return False


def _install(url: str, part: Path, target: Path, checksum: tuple[str, str] | None,
             actual: str, algorithm: str, **stamp_extra: Any) -> None:
    """Verify ``part`` against ``checksum`` and rename it to ``target`` (atomic), or delete it."""
    if checksum is not None and actual != checksum[1]:
        _unlink_quiet(part)
        raise DownloadError(
            f"cannot use {redact_url(url)}: checksum mismatch for {target.name}: expected "
            f"{checksum[0]} {checksum[1]}, got {actual}. The corrupt download was deleted. "
            "If the file changed upstream, update the checksum in the source (data.sources "
            "in params.yaml); otherwise re-run to download it again.",
            url=redact_url(url),
        )
    _unlink_quiet(_stamp_path(target))
    os.replace(part, target)
    _write_stamp(target, algorithm, actual, **stamp_extra)


# --------------------------------------------------------------------------------------------
# fetch


def fetch(
    source: Source,
    downloads_dir: Path,
    *,
    s3_endpoint_url: str | None = None,
    s3_profile: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool | None = None,
    timeout: float = 60.0,
) -> Path:
    """Bring ``source`` into ``downloads_dir`` verified, and return the file's path.

    A file already in place that matches the checksum is not fetched again (a
    ``<file>.verified`` stamp with its size and mtime saves re-hashing it; when size or mtime
    changed the file is hashed again, and fetched again if it no longer matches).

    Args:
        source: what to fetch.
        downloads_dir: where the file goes (created if missing); the result is
            ``downloads_dir / source.filename``.
        s3_endpoint_url: S3 endpoint (MinIO, Ceph, moto, ...); default ``AWS_ENDPOINT_URL_S3``
            or ``AWS_ENDPOINT_URL`` from the environment, else AWS itself.
        s3_profile: AWS profile for S3 credentials; default: the environment / default chain.
        retries: extra attempts after a transient failure (connection errors, timeouts, HTTP
            5xx/408/429); ``0`` tries once. For S3 it sets botocore's retry budget.
        backoff: seconds before the first retry, doubled after each (capped at 60 s).
        progress: show a tqdm progress bar; ``None`` means "when stderr is a terminal".
        timeout: socket timeout in seconds for connecting and for each read.

    Returns:
        The path of the verified file.

    Raises:
        DownloadError: the file could not be fetched or did not match its checksum (a corrupt
            download is deleted; an interrupted one is kept as ``.part`` for resuming).
        ValueError: for bad ``retries``/``backoff``/``timeout``.
    """
    if not isinstance(source, Source):
        raise TypeError(f"fetch() expects a Source, got {type(source).__name__}")
    if retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(
            f"fetch(): retries and backoff must be >= 0 and timeout > 0, got retries={retries}, "
            f"backoff={backoff}, timeout={timeout}"
        )
    downloads_dir = Path(downloads_dir)
    downloads_dir.mkdir(parents=True, exist_ok=True)
    target = downloads_dir / str(source.filename)
    show = _want_progress(progress)

    if not source.is_remote and not source.mirrors:
        return _fetch_local(source.url, source, target, progress=show)

    checksum = source.checksum
    assert checksum is not None  # enforced by Source for remote sources
    if _verified_in_place(target, checksum, show):
        log.info("%s: already downloaded and verified", target)
        return target

    urls = [source.url, *source.mirrors]
    errors: list[DownloadError] = []
    for i, url in enumerate(urls):
        try:
            scheme = _url_scheme(url)
            if scheme in ("http", "https"):
                _fetch_http(url, target, checksum, retries=retries, backoff=backoff,
                            timeout=timeout, progress=show)
            elif scheme == "s3":
                _fetch_s3(url, target, checksum, endpoint_url=s3_endpoint_url,
                          profile=s3_profile, retries=retries, timeout=timeout, progress=show)
            else:
                _fetch_local(url, source, target, progress=show)
            return target
        except DownloadError as exc:
            errors.append(exc)
            if exc._fatal or i == len(urls) - 1:
                break
            log.warning("%s; trying the next mirror %s", exc, redact_url(urls[i + 1]))
    if len(errors) == 1:
        raise errors[0]
    raise DownloadError(
        f"cannot download {source.filename}: all {len(errors)} locations failed:\n"
        + "\n".join(f"  - {e}" for e in errors),
        url=redact_url(source.url),
    )


# http(s) ------------------------------------------------------------------------------------


class _PartHasher:
    """Keeps a running digest consistent with the bytes of the ``.part`` file on disk."""

    def __init__(self, part: Path, algorithm: str) -> None:
        self.part = part
        self.algorithm = algorithm
        self.hasher = _new_hasher(algorithm)
        self.nbytes = 0

    def sync(self) -> int:
        """Re-hash the part file if it changed behind our back; return its size."""
        size = _size_or_zero(self.part)
        if size != self.nbytes:
            self.reset()
            if size:
                with open(self.part, "rb") as f:
                    while chunk := f.read(CHUNK_SIZE):
                        self.update(chunk)
        return self.nbytes

    def reset(self) -> None:
        self.hasher = _new_hasher(self.algorithm)
        self.nbytes = 0

    def update(self, chunk: bytes) -> None:
        self.hasher.update(chunk)
        self.nbytes += len(chunk)

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()


def _fetch_http(url: str, target: Path, checksum: tuple[str, str], *, retries: int,
                backoff: float, timeout: float, progress: bool) -> None:
    part = target.with_name(target.name + PART_SUFFIX)
    resumed_from = _size_or_zero(part)
    actual = _download_http(url, part, checksum[0], retries=retries, backoff=backoff,
                            timeout=timeout, progress=progress)
    if actual != checksum[1] and resumed_from:
        # The bytes kept from an earlier run may belong to another version of the file:
        # give it one clean download before calling it a mismatch.
        log.warning(
            "%s: checksum mismatch after resuming at byte %d; downloading again from scratch",
            redact_url(url), resumed_from,
        )
        _unlink_quiet(part)
        actual = _download_http(url, part, checksum[0], retries=retries, backoff=backoff,
                                timeout=timeout, progress=progress)
    _install(url, part, target, checksum, actual, checksum[0])


def _download_http(url: str, part: Path, algorithm: str, *, retries: int, backoff: float,
                   timeout: float, progress: bool) -> str:
    """Download ``url`` into ``part`` (resuming), with retries; return the part's digest."""
    state = _PartHasher(part, algorithm)
    attempt = 0
    best = _size_or_zero(part)
    restarted_after_416 = False
    while True:
        try:
            return _http_attempt(url, part, state, timeout=timeout, progress=progress)
        except _RangeNotSatisfiable as exc:
            size = state.sync()
            if exc.total is None or exc.total == size:
                log.info("%s: the partial file is already complete; verifying it", part)
                return state.hexdigest()
            if restarted_after_416:
                raise DownloadError(
                    f"cannot download {redact_url(url)}: the server keeps rejecting the byte "
                    f"range (HTTP 416) even for a fresh download; check the URL",
                    url=redact_url(url),
                ) from None
            log.warning(
                "%s: the server has %s bytes but %s holds %d; starting again from byte 0",
                redact_url(url), exc.total, part, size,
            )
            restarted_after_416 = True
            _unlink_quiet(part)
        except _Retryable as exc:
            size = _size_or_zero(part)
            if size > best:  # progress was made: a fresh retry budget for the rest
                best = size
                attempt = 0
            if attempt >= retries:
                kept = (
                    f" The {_human(size)} already received are kept in {part}; re-running "
                    "resumes from there." if size else ""
                )
                raise DownloadError(
                    f"cannot download {redact_url(url)}: {exc} (gave up after {attempt + 1} "
                    f"attempt{'s' if attempt else ''}). Check the network connection, proxy "
                    f"settings and the URL, then re-run.{kept}",
                    url=redact_url(url),
                ) from None
            delay = min(backoff * (2 ** attempt), _MAX_BACKOFF_S)
            attempt += 1
            log.warning("%s: %s; retry %d of %d in %.1f s", redact_url(url), exc, attempt,
                        retries, delay)
            time.sleep(delay)


def _describe_net_error(exc: BaseException | str, timeout: float) -> str:
    if isinstance(exc, str):
        return exc
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running, and are host and port right?)"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror or exc})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timed out (no data for {timeout:g} s)"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _http_status_error(url: str, code: int, reason: str) -> DownloadError:
    shown = redact_url(url)
    if code in (404, 410):
        why = (f"HTTP {code} {reason}: the server has no file at this address. Check the URL "
               "(data.sources in params.yaml, or the dataset preset) and that the file still "
               "exists there")
    elif code in (401, 403):
        why = (f"HTTP {code} {reason}: the server refused access. The URL may need "
               "authorisation or may have expired (pre-signed URLs do); fetch it by other means "
               "and use a file:// source, or fix the URL")
    else:
        why = f"HTTP {code} {reason}: the server rejected the request; check the URL"
    return DownloadError(f"cannot download {shown}: {why}.", url=shown)


def _local_write_error(exc: OSError, path: Path, url: str) -> DownloadError:
    shown = redact_url(url)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        try:
            free = _human(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "unknown"
        kept = _size_or_zero(path)
        err = DownloadError(
            f"cannot download {shown}: no space left on the device holding {path.parent} "
            f"({free} free) while writing {path.name}. Free some space or point the data root "
            f"(data.root) at a bigger disk, then re-run"
            + (f"; the {_human(kept)} already written are kept and the download resumes."
               if kept and path.name.endswith(PART_SUFFIX) else "."),
            url=shown,
        )
    else:
        err = DownloadError(
            f"cannot download {shown}: cannot write {path}: {exc.strerror or exc}. Check that "
            "the downloads directory is writable.",
            url=shown,
        )
    err._fatal = True
    return err


def _http_attempt(url: str, part: Path, state: _PartHasher, *, timeout: float,
                  progress: bool) -> str:
    offset = state.sync()
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            m = _UNSATISFIED_RANGE_RE.search(exc.headers.get("Content-Range", "") or "")
            raise _RangeNotSatisfiable(int(m.group(1)) if m else None) from None
        if exc.code >= 500 or exc.code in (408, 425, 429):
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise _http_status_error(url, exc.code, str(exc.reason)) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise DownloadError(
                f"cannot download {redact_url(url)}: TLS certificate verification failed "
                f"({exc.reason.verify_message}). Check the URL, or point SSL_CERT_FILE at your "
                "organisation's CA bundle.",
                url=redact_url(url),
            ) from None
        raise _Retryable(_describe_net_error(exc.reason, timeout)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(_describe_net_error(exc, timeout)) from None

    with response:
        status = response.status
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if status == 206:
            m = _CONTENT_RANGE_RE.search(response.headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != offset:
                # A range we did not ask for: start clean rather than splice wrong bytes.
                _unlink_quiet(part)
                raise _Retryable("the server answered with a different byte range than asked")
            total = int(m.group(3)) if m.group(3) != "*" else (
                offset + length if length is not None else None)
            mode = "ab"
            log.info("%s: resuming at byte %d", redact_url(url), offset)
        elif status == 200:
            if offset:
                log.info("%s: the server ignored the Range request; restarting from byte 0",
                         redact_url(url))
            offset = 0
            state.reset()
            total = length
            mode = "wb"
        else:
            raise DownloadError(
                f"cannot download {redact_url(url)}: unexpected HTTP status {status}; check "
                "the URL", url=redact_url(url),
            )

        received = 0
        try:
            with open(part, mode) as f, _progress_bar(
                total, offset, part.name[: -len(PART_SUFFIX)], progress
            ) as bar:
                while True:
                    try:
                        chunk = response.read(CHUNK_SIZE)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Retryable(
                            f"connection lost after {offset + received} bytes: "
                            f"{_describe_net_error(exc, timeout)}"
                        ) from None
                    if not chunk:
                        break
                    f.write(chunk)
                    state.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except OSError as exc:  # reads are wrapped above: this is the local file
            raise _local_write_error(exc, part, url) from None

    if length is not None and received < length:
        of_total = f" of {total}" if total is not None else ""
        raise _Retryable(f"connection closed after {offset + received}{of_total} bytes")
    return state.hexdigest()


# s3 -------------------------------------------------------------------------------------------


def _fetch_s3(url: str, target: Path, checksum: tuple[str, str], *, endpoint_url: str | None,
              profile: str | None, retries: int, timeout: float, progress: bool) -> None:
    part = target.with_name(target.name + PART_SUFFIX)
    _download_s3(url, part, endpoint_url=endpoint_url, profile=profile, retries=retries,
                 timeout=timeout, progress=progress)
    actual = hash_file(part, checksum[0], progress=progress)
    _install(url, part, target, checksum, actual, checksum[0])


def _s3_error(url: str, code: str, status: Any, bucket: str, key: str,
              endpoint: str | None) -> DownloadError:
    shown = redact_url(url)
    where = f" at {endpoint}" if endpoint else ""
    creds = ("Check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / data.s3.profile "
             "and ~/.aws/credentials)")
    if code == "InvalidAccessKeyId":
        why = (f"the access key id is not known to the S3 service{where} (InvalidAccessKeyId). "
               f"{creds}, and that data.s3.endpoint_url points at the service the key belongs to")
    elif code == "SignatureDoesNotMatch":
        why = ("the secret access key does not match the access key id "
               f"(SignatureDoesNotMatch). {creds}")
    elif code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired", "ExpiredTokenException"):
        why = (f"the session token is expired or invalid ({code}). Refresh your temporary "
               "credentials (e.g. `aws sso login`) or unset AWS_SESSION_TOKEN")
    elif code in ("AccessDenied", "403", "AllAccessDisabled", "InvalidObjectState"):
        why = (f"access denied ({code}, HTTP {status}). The credentials in use are wrong or lack "
               "s3:GetObject on this object (without s3:ListBucket S3 also answers 403 for a "
               f"missing key). {creds}, and the bucket policy")
    elif code == "NoSuchBucket":
        why = (f"bucket {bucket!r} does not exist{where} (NoSuchBucket). Check the bucket name "
               "in the URL and data.s3.endpoint_url / the region")
    elif code in ("NoSuchKey", "404"):
        why = (f"there is no object {key!r} in bucket {bucket!r} (NoSuchKey). Check the key; "
               f"`aws s3 ls s3://{bucket}/{key.rsplit('/', 1)[0] + '/' if '/' in key else ''}` "
               "lists what is there")
    elif code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
        why = (f"the bucket is in another region ({code}). Set AWS_DEFAULT_REGION to the "
               "bucket's region")
    else:
        why = f"S3 error {code} (HTTP {status})"
    return DownloadError(f"cannot download {shown}: {why}.", url=shown)


def _download_s3(url: str, part: Path, *, endpoint_url: str | None, profile: str | None,
                 retries: int, timeout: float, progress: bool) -> None:
    """Download ``s3://bucket/key`` into ``part`` with boto3's managed transfer."""
    shown = redact_url(url)
    try:
        import boto3
        import boto3.exceptions
        import botocore.exceptions as bex
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config
    except ImportError:  # pragma: no cover - boto3 is a project dependency
        raise DownloadError(
            f"cannot download {shown}: boto3 is not installed; install it to use s3:// sources",
            url=shown,
        ) from None

    parsed = urllib.parse.urlsplit(url)
    bucket, key = parsed.netloc, urllib.parse.unquote(parsed.path.lstrip("/"))
    endpoint = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    client = None
    try:
        session = boto3.session.Session(profile_name=profile) if profile else boto3.session.Session()
        client = session.client(
            "s3", endpoint_url=endpoint,
            config=Config(retries={"max_attempts": retries + 1, "mode": "standard"},
                          connect_timeout=timeout, read_timeout=timeout),
        )
        head = client.head_object(Bucket=bucket, Key=key)
        size = head.get("ContentLength")
        config = TransferConfig(multipart_threshold=_S3_MULTIPART_BYTES,
                                multipart_chunksize=_S3_MULTIPART_BYTES, max_concurrency=8)
        with _progress_bar(size, 0, part.name[: -len(PART_SUFFIX)], progress) as bar:
            client.download_file(bucket, key, str(part), Config=config, Callback=bar.update)
    except bex.ProfileNotFound:
        raise DownloadError(
            f"cannot download {shown}: AWS profile {profile!r} was not found. Define it in "
            "~/.aws/config or ~/.aws/credentials (or the files named by AWS_CONFIG_FILE / "
            "AWS_SHARED_CREDENTIALS_FILE), or set data.s3.profile to an existing profile or null.",
            url=shown,
        ) from None
    except (bex.NoCredentialsError, bex.PartialCredentialsError):
        raise DownloadError(
            f"cannot download {shown}: no (complete) AWS credentials were found. Set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary "
            "credentials), or AWS_PROFILE / data.s3.profile naming a profile.",
            url=shown,
        ) from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
            bex.ConnectionClosedError) as exc:
        raise DownloadError(
            f"cannot download {shown}: cannot reach the S3 endpoint "
            f"{endpoint or 'of AWS'} after {retries + 1} attempt(s) ({type(exc).__name__}). "
            "Check data.s3.endpoint_url / AWS_ENDPOINT_URL and the network, then re-run.",
            url=shown,
        ) from None
    except bex.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "unknown"))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        if client is not None:
            code = _s3_refine_code(client, bucket, key, code)
        raise _s3_error(url, code, status, bucket, key, endpoint) from None
    except boto3.exceptions.Boto3Error as exc:
        raise DownloadError(
            f"cannot download {shown}: the S3 transfer failed ({type(exc).__name__}); re-run "
            "to try again.", url=shown,
        ) from None
    except OSError as exc:
        raise _local_write_error(exc, part, url) from None
    except bex.BotoCoreError as exc:
        raise DownloadError(
            f"cannot download {shown}: S3 client error ({type(exc).__name__}); check the S3 "
            "settings (endpoint, region, profile).", url=shown,
        ) from None


def _s3_refine_code(client: Any, bucket: str, key: str, code: str) -> str:
    """HEAD answers carry no error body (code ``"403"``/``"404"``); ask once more for details."""
    if code not in ("400", "403", "404", "301"):
        return code
    import botocore.exceptions as bex

    try:
        client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
    except bex.ClientError as exc:
        detailed = str(exc.response.get("Error", {}).get("Code", code))
        if not detailed.isdigit():
            return detailed
    except bex.BotoCoreError:
        return code
    if code == "404":
        try:
            client.head_bucket(Bucket=bucket)
        except bex.ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket"):
                return "NoSuchBucket"
        except bex.BotoCoreError:
            pass
        return "NoSuchKey"
    return code


# file:// and plain paths ------------------------------------------------------------------------


def _local_path(url: str) -> Path:
    if _url_scheme(url) == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))
    return Path(url).expanduser()


def _fetch_local(url: str, source: Source, target: Path, *, progress: bool) -> Path:
    """Copy a local file into place, verified (checksum optional for local files)."""
    shown = redact_url(url)
    src = _local_path(url)
    if not src.exists():
        raise DownloadError(
            f"cannot copy {shown}: no such file {src} (relative paths are resolved against the "
            f"working directory {Path.cwd()}). Check the path in data.sources.",
            url=shown,
        )
    if not src.is_file():
        raise DownloadError(
            f"cannot copy {shown}: {src} is not a regular file; point the source at a file "
            "(pack a directory as .tar.gz first)",
            url=shown,
        )
    checksum = source.checksum
    algorithm = checksum[0] if checksum else "sha256"

    if target.exists() and os.path.samefile(src, target):  # already the downloads file
        actual = hash_file(target, algorithm, progress=progress)
        if checksum and actual != checksum[1]:
            raise DownloadError(
                f"cannot use {shown}: checksum mismatch: expected {checksum[0]} {checksum[1]}, "
                f"got {actual}. Fix the checksum in data.sources or replace the file.",
                url=shown,
            )
        _write_stamp(target, algorithm, actual)
        return target

    src_st = src.stat()
    if checksum:
        if _verified_in_place(target, checksum, progress):
            return target
    else:
        stamp = _read_stamp(target)
        if (stamp and stamp.get("source_size") == src_st.st_size
                and stamp.get("source_mtime_ns") == src_st.st_mtime_ns):
            log.debug("%s: up to date with %s", target, src)
            return target

    part = target.with_name(target.name + PART_SUFFIX)
    hasher = _new_hasher(algorithm)
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout, _progress_bar(
            src_st.st_size, 0, target.name, progress
        ) as bar:
            while chunk := fin.read(CHUNK_SIZE):
                fout.write(chunk)
                hasher.update(chunk)
                bar.update(len(chunk))
    except OSError as exc:
        err = _local_write_error(exc, part, url)
        _unlink_quiet(part)  # a local copy is cheap to redo
        raise err from None
    _install(url, part, target, checksum, hasher.hexdigest(), algorithm,
             source_size=src_st.st_size, source_mtime_ns=src_st.st_mtime_ns)
    return target


# --------------------------------------------------------------------------------------------
# safe extraction


def _check_entry_name(archive: Path, name: str) -> list[str]:
    """Path components of an archive entry; ``UnsafeArchiveError`` for absolute or ``..`` paths.

    Backslashes count as separators for this check, so ``..\\x`` is refused too.
    """
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: entry {name!r} has a NUL byte in its name; refusing "
                                 "to extract this archive")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE_RE.match(norm):
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} has an absolute path and would be written outside the "
            "destination; refusing to extract this archive (nothing was written)"
        )
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: entry {name!r} contains a '..' component and would be written outside "
            "the destination; refusing to extract this archive (nothing was written)"
        )
    return parts


def _resolve_inside(parts: Sequence[str], links: Mapping[str, str]) -> list[str] | None:
    """Resolve ``parts`` below the destination, following the archive's own symlinks.

    Returns the resolved components, or ``None`` when the path leaves the destination (or
    loops). This is a lexical model of what the file system will do once the archive's links
    exist, so ``a/b -> .`` followed by ``c -> a/b/../..`` is caught.
    """
    stack: list[str] = []
    queue = list(parts)
    hops = 0
    while queue:
        part = queue.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(part)
        target = links.get("/".join(stack))
        if target is not None:
            hops += 1
            norm = target.replace("\\", "/")
            if hops > _MAX_LINK_HOPS or norm.startswith("/") or _DRIVE_RE.match(norm):
                return None
            stack.pop()
            queue = norm.split("/") + queue
    return stack


def _validate_tar_members(archive: Path, members: list[tarfile.TarInfo]) -> list[list[str]]:
    """Check every member; return each member's path components. Raises UnsafeArchiveError."""
    all_parts: list[list[str]] = []
    links: dict[str, str] = {}
    link_names: set[str] = set()
    names: set[str] = set()
    for m in members:
        parts = _check_entry_name(archive, m.name)
        all_parts.append(parts)
        key = "/".join(parts)
        if m.ischr() or m.isblk() or m.isfifo():
            kind = "FIFO" if m.isfifo() else "device file"
            raise UnsafeArchiveError(
                f"{archive}: entry {m.name!r} is a {kind}; refusing to extract this archive "
                "(only regular files, directories and links inside the archive are allowed)"
            )
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise UnsafeArchiveError(
                f"{archive}: entry {m.name!r} has an unsupported type {m.type!r}; refusing to "
                "extract this archive"
            )
        if (m.issym() or m.islnk()) and not parts:
            raise UnsafeArchiveError(f"{archive}: entry {m.name!r} replaces the destination "
                                     "directory itself with a link; refusing")
        if m.issym():
            if key in names:
                raise UnsafeArchiveError(f"{archive}: symlink entry {m.name!r} shadows an earlier "
                                         "entry of the same name; refusing to extract this archive")
            links[key] = m.linkname
            link_names.add(key)
        elif key in link_names:
            raise UnsafeArchiveError(f"{archive}: entry {m.name!r} reuses the name of a symlink "
                                     "entry; refusing to extract this archive")
        names.add(key)

    for m, parts in zip(members, all_parts):
        if not parts:
            continue
        if _resolve_inside(parts[:-1], links) is None:
            raise UnsafeArchiveError(
                f"{archive}: entry {m.name!r} lies below a symlink that points outside the "
                "destination; refusing to extract this archive (nothing was written)"
            )
        if m.issym():
            if not m.linkname:
                raise UnsafeArchiveError(f"{archive}: symlink entry {m.name!r} has an empty target")
            resolved = _resolve_inside(parts, links)  # follows this very link
        elif m.islnk():
            target_parts = _check_link_target(archive, m)
            resolved = _resolve_inside(target_parts, links)
            if resolved is not None and not resolved:
                resolved = None  # a hard link to the destination directory itself
        else:
            resolved = _resolve_inside(parts, links)
        if resolved is None:
            kind = "symlink" if m.issym() else "hard link" if m.islnk() else "entry"
            arrow = f" -> {m.linkname!r}" if (m.issym() or m.islnk()) else ""
            raise UnsafeArchiveError(
                f"{archive}: {kind} {m.name!r}{arrow} resolves outside the destination; "
                "refusing to extract this archive (nothing was written)"
            )
    return all_parts


def _check_link_target(archive: Path, m: tarfile.TarInfo) -> list[str]:
    norm = m.linkname.replace("\\", "/")
    if not norm or norm.startswith("/") or _DRIVE_RE.match(norm):
        raise UnsafeArchiveError(
            f"{archive}: hard link {m.name!r} -> {m.linkname!r} points outside the destination; "
            "refusing to extract this archive (nothing was written)"
        )
    return norm.split("/")


def _sanitized_for_old_python(m: tarfile.TarInfo) -> tarfile.TarInfo:
    """What ``filter='data'`` does to modes/owners, for Pythons without extraction filters."""
    m = m.replace() if hasattr(m, "replace") else m
    if m.isreg() or m.islnk():
        m.mode = (m.mode & 0o755) | 0o600
    elif m.isdir():
        m.mode = (m.mode & 0o755) | 0o700
    if hasattr(os, "getuid"):
        m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
    return m


def _check_tree(root: Path, archive: Path) -> None:
    """Defence in depth after extraction: every symlink must resolve inside ``root``."""
    real_root = os.path.realpath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                real = os.path.realpath(path)
                if os.path.commonpath([real_root, real]) != real_root:
                    raise UnsafeArchiveError(
                        f"{archive}: extracted link {os.path.relpath(path, root)!r} resolves "
                        "outside the destination; refusing this archive"
                    )


def _merge_move(src: Path, dst: Path) -> None:
    """Move the tree ``src`` into ``dst``, merging directories; files are replaced."""
    dst.mkdir(parents=True, exist_ok=True)
    with os.scandir(src) as it:
        entries = list(it)
    for entry in entries:
        target = dst / entry.name
        if entry.is_dir(follow_symlinks=False) and target.is_dir() and not target.is_symlink():
            _merge_move(Path(entry.path), target)
            continue
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
        os.replace(entry.path, target)


def _check_space(archive: Path, dest: Path, needed: int) -> None:
    """Refuse early (``ENOSPC``) when the file system of ``dest`` has less than ``needed`` free."""
    existing = dest
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return
    if needed > free:
        raise NoSpaceError(
            errno.ENOSPC,
            f"extracting {archive} needs {_human(needed)} but only {_human(free)} are free on "
            f"{existing}; free some space or point the data root (data.root) at a bigger disk",
        )


def _archive_identity(archive: Path) -> dict[str, Any]:
    st = archive.stat()
    stamp = _read_stamp(archive)
    digest = f"{stamp['algorithm']}:{stamp['digest']}" if stamp else None
    return {"archive": archive.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "digest": digest}


def _extract_stamp_path(archive: Path, dest: Path) -> Path:
    return dest / f"{_EXTRACT_STAMP_PREFIX}{archive.name}.json"


def _already_extracted(archive: Path, dest: Path, identity: dict[str, Any]) -> list[Path] | None:
    try:
        record = json.loads(_extract_stamp_path(archive, dest).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("size") != identity["size"]:
        return None
    same = (record.get("digest") == identity["digest"] if record.get("digest") and identity["digest"]
            else record.get("mtime_ns") == identity["mtime_ns"])
    if not same:
        return None
    paths = [dest / rel for rel in record.get("files", [])]
    if not all(os.path.lexists(p) for p in paths):
        return None
    return paths


def safe_extract(archive: Path, dest: Path, *, progress: bool | None = None) -> list[Path]:
    """Extract ``archive`` into ``dest`` safely and return the paths of the extracted entries.

    Supports .tar, .tar.gz/.tgz, .tar.bz2/.tbz2, .tar.xz/.txz and .zip (by file name). All
    entries are checked before anything is written; the archive is refused with
    :class:`UnsafeArchiveError` (naming the archive and the entry) when an entry has an absolute
    path or a ``..`` component, is a symlink or hard link resolving outside ``dest`` (also through
    other links in the archive), or is a device file or FIFO. Then the archive is extracted into a
    temporary directory beside ``dest`` (with ``tarfile``'s ``filter='data'`` where available,
    else equivalent mode/owner sanitising) and moved into place, merging into existing
    directories. Zip entries are always written as regular files and directories.

    A stamp ``dest/.extracted-<archive name>.json`` records the archive's size and digest (from
    its ``.verified`` stamp, else its mtime) and the extracted files; extracting the same archive
    into the same ``dest`` again returns those paths without re-extracting as long as they exist.

    Args:
        archive: the archive file.
        dest: destination directory (created if missing).
        progress: accepted for symmetry with :func:`fetch` (extraction shows no bar yet).

    Returns:
        Paths below ``dest`` of the extracted files and links (directories are not listed),
        in archive order.

    Raises:
        UnsafeArchiveError: an unsafe entry; nothing was written.
        ValueError: unsupported archive type, or a missing/corrupt archive.
        OSError: not enough free space (``ENOSPC``) or other I/O errors; nothing is left in
            ``dest`` from a failed extraction.
    """
    del progress  # reserved
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive.name)
    if kind is None:
        raise InputError(
            f"cannot extract {archive}: unsupported archive type; supported endings: "
            f"{', '.join(ARCHIVE_SUFFIXES)}"
        )
    if not archive.is_file():
        raise InputError(f"cannot extract {archive}: no such file")
    identity = _archive_identity(archive)
    done = _already_extracted(archive, dest, identity)
    if done is not None:
        log.info("%s: already extracted into %s", archive, dest)
        return done

    try:
        if kind == "zip":
            rel_files = _extract_zip(archive, dest)
        else:
            rel_files = _extract_tar(archive, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(
            f"cannot extract {archive}: the archive is corrupt or not a {kind} file ({exc}); "
            "delete it and its .verified stamp and download it again"
        ) from None

    record = {**identity, "files": rel_files}
    _atomic_write_text(_extract_stamp_path(archive, dest), json.dumps(record, sort_keys=True) + "\n")
    return [dest / rel for rel in rel_files]


def _staging_dir(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))


def _extract_tar(archive: Path, dest: Path) -> list[str]:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        all_parts = _validate_tar_members(archive, members)
        _check_space(archive, dest, sum(m.size for m in members if m.isreg()))
        staging = _staging_dir(dest)
        try:
            if _HAS_DATA_FILTER:
                try:
                    tf.extractall(staging, members=members, filter="data")
                except tarfile.FilterError as exc:  # our checks should have caught it first
                    raise UnsafeArchiveError(f"{archive}: {exc}; refusing this archive") from None
            else:
                tf.extractall(staging, members=[_sanitized_for_old_python(m) for m in members])
            _check_tree(staging, archive)
            _merge_move(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    seen: dict[str, None] = {}
    for m, parts in zip(members, all_parts):
        if parts and not m.isdir():
            seen["/".join(parts)] = None
    return list(seen)


def _extract_zip(archive: Path, dest: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        rel_files: dict[str, None] = {}
        for info in infos:
            parts = _check_entry_name(archive, info.filename)
            mode = info.external_attr >> 16
            if info.create_system == 3 and (
                stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
            ):
                raise UnsafeArchiveError(
                    f"{archive}: entry {info.filename!r} is a device file, FIFO or socket; "
                    "refusing to extract this archive"
                )
            if parts and not info.is_dir():
                rel_files["/".join(parts)] = None
        _check_space(archive, dest, sum(i.file_size for i in infos))
        staging = _staging_dir(dest)
        try:
            zf.extractall(staging)
            _check_tree(staging, archive)
            _merge_move(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return list(rel_files)


# --------------------------------------------------------------------------------------------
# everything


def download_all(
    sources: Iterable[Source],
    downloads_dir: Path,
    raw_dir: Path,
    **fetch_kwargs: Any,
) -> list[Path]:
    """Fetch every source into ``downloads_dir``, then extract those with ``extract=True``.

    All sources are fetched first (so a network problem shows up before minutes of extraction),
    then archives are extracted with :func:`safe_extract` into ``raw_dir`` or
    ``raw_dir / source.extract_to``.

    Args:
        sources: the files to fetch; their file names must be distinct.
        downloads_dir: where verified files go (e.g. ``data/downloads``).
        raw_dir: where archives are extracted (e.g. ``data/raw``).
        **fetch_kwargs: passed to :func:`fetch` (``s3_endpoint_url``, ``s3_profile``,
            ``retries``, ``backoff``, ``progress``, ``timeout``).

    Returns:
        The paths of the fetched files, in the order of ``sources``.
    """
    sources = list(sources)
    seen: dict[str, str] = {}
    for s in sources:
        if s.filename in seen:
            raise InputError(
                f"sources {redact_url(seen[str(s.filename)])!r} and {redact_url(s.url)!r} would "
                f"both be saved as {s.filename!r}; give one of them another `filename`"
            )
        seen[str(s.filename)] = s.url
    paths = [fetch(s, downloads_dir, **fetch_kwargs) for s in sources]
    raw_dir = Path(raw_dir)
    for s, path in zip(sources, paths):
        if s.extract:
            dest = raw_dir / s.extract_to if s.extract_to else raw_dir
            files = safe_extract(path, dest, progress=fetch_kwargs.get("progress"))
            log.info("%s: %d files in %s", path.name, len(files), dest)
    return paths


# ---------------------------------------------------------------------------------------------
# The `download` stage


def stage_sources(dataset: str, sources: Iterable[Mapping[str, Any]] = ()) -> list[Source]:
    """The sources of a params ``data.dataset``: a named preset, or ``data.sources`` for custom."""
    from .presets import resolve_preset

    if dataset == "custom":
        return [Source.from_dict(dict(s), where=f"data.sources[{i}]") for i, s in enumerate(sources)]
    return resolve_preset(dataset)


def run_download(
    *,
    dataset: str,
    data_root: Path,
    sources: Iterable[Mapping[str, Any]] = (),
    synthetic_images: int = 3300,
    synthetic_seed: int = 0,
    synthetic_scenes: Mapping[str, Any] | None = None,
    s3_endpoint_url: str | None = None,
    s3_profile: str | None = None,
) -> dict[str, Any]:
    """Bring the dataset into ``data_root/downloads`` and extract it into ``data_root/raw``.

    The synthetic set is generated as a tar archive in downloads and then goes through the same
    safe extraction as PASCAL VOC; ``synthetic_scenes`` are extra ``generate_scenes`` keyword
    arguments (scene difficulty), part of the archive's name. Returns a summary (files, bytes).
    """
    downloads, raw = Path(data_root) / "downloads", Path(data_root) / "raw"
    downloads.mkdir(parents=True, exist_ok=True)
    raw.mkdir(parents=True, exist_ok=True)
    if dataset == "synthetic":
        from fssd.data.synthetic import write_scenes_archive

        scenes = dict(synthetic_scenes or {})
        # the archive's name says everything its bytes depend on, so a changed knob regenerates it
        knobs = hashlib.sha256(json.dumps(scenes, sort_keys=True).encode()).hexdigest()[:8]
        archive = downloads / f"synthetic-{synthetic_images}-seed{synthetic_seed}-{knobs}.tar"
        if not archive.is_file():
            write_scenes_archive(archive, synthetic_images, synthetic_seed, **scenes)
        safe_extract(archive, raw)
        files = [archive]
    else:
        files = download_all(stage_sources(dataset, sources), downloads, raw,
                             s3_endpoint_url=s3_endpoint_url, s3_profile=s3_profile)
    return {"files": [str(f) for f in files], "bytes": sum(Path(f).stat().st_size for f in files)}
