"""`model.init`: where a fine-tuning run's starting detector comes from.

``model.init`` names a trained FSSD checkpoint in one of three ways, and :func:`resolve_init`
brings it to a local file that :func:`fssd.checkpoint.load_checkpoint` reads:

* a local path (``models/coco.pt``; ``file:///abs/path`` too), made absolute;
* ``s3://bucket/key`` (or ``https://...``), fetched with :func:`pipeline.download.fetch` and
  verified by ``model.init_sha256`` (required: remote files are verified by checksum);
* an MLflow registry URI, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the version's
  logged pyfunc model (``fssd register``) holds the checkpoint as its artifact ``checkpoint`` (a
  slim copy of ``models/fssd.pt``); that one file is downloaded.

When ``sha256`` is given, the resolved file must have it, whatever the kind of URI.
The weights are then loaded with :func:`fssd.weights.transfer_detector`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import InputError, MissingFileError

__all__ = ["resolve_init", "REGISTRY_URI"]

REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
_REMOTE = ("s3://", "http://", "https://")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha256(path: Path, sha256: str | None, uri: str) -> None:
    if sha256 is None:
        return
    want = sha256.strip().lower()
    got = _sha256(path)
    if got != want:
        raise InputError(
            f"model.init {uri!r}: the checkpoint {path} has sha256 {got}, but model.init_sha256 is {want}; "
            "set model.init_sha256 to the checkpoint you mean (sha256sum FILE) or point model.init at it"
        )


def _redact(uri: str) -> str:
    from .download import redact_url

    return redact_url(uri)


def _from_registry(uri: str, name: str, alias: str | None, version: str | None, tracking_uri: str,
                   workdir: Path) -> Path:
    import mlflow.artifacts
    import yaml
    from mlflow.exceptions import MlflowException

    from .register import CHECKPOINT_ARTIFACT
    from .tracking import client as mlflow_client
    from .tracking import resolve_tracking_uri

    store = resolve_tracking_uri(tracking_uri)
    shown = _redact(store)
    if store.startswith("sqlite:///") and not Path(store[len("sqlite:///"):]).is_file():
        # MLflow would create an empty store there; say where we looked instead
        raise MissingFileError(
            f"model.init {uri!r}: there is no MLflow store at {store[len('sqlite:///'):]}; run from the project "
            "root (where mlflow.db is), set mlflow.tracking_uri / MLFLOW_TRACKING_URI, or give a checkpoint path"
        )
    c = mlflow_client(store)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
        version = str(mv.version)
        root = c.get_model_version_download_uri(name, version).rstrip("/")
    except MlflowException as e:
        which = f"alias {alias!r}" if alias else f"version {version}"
        raise InputError(
            f"model.init {uri!r}: the MLflow registry at {shown} has no {which} of model {name!r} ({e.message}); "
            "register the source model first (run its pipeline, e.g. configs/fssd300_coco.yaml, through "
            "`fssd register`) or fix the name/alias (the MLflow UI lists them)"
        ) from None

    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".init-", dir=workdir))
    try:
        try:
            mlmodel = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/MLmodel", dst_path=str(tmp / "meta"), tracking_uri=store))
            conf = yaml.safe_load(mlmodel.read_text()) or {}
            arts = ((conf.get("flavors") or {}).get("python_function") or {}).get("artifacts") or {}
            entry = arts.get(CHECKPOINT_ARTIFACT)
            rel = entry.get("path") if isinstance(entry, dict) else None
            if not rel:
                raise InputError(
                    f"model.init {uri!r}: version {version} of {name!r} is not an FSSD model (its MLmodel has no "
                    f"{CHECKPOINT_ARTIFACT!r} artifact); point model.init at a model registered by `fssd register`"
                )
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/{rel}", dst_path=str(tmp / "ckpt"), tracking_uri=store))
        except MlflowException as e:
            raise InputError(f"model.init {uri!r}: cannot download version {version} of {name!r} from {shown}: "
                             f"{e.message}") from None
        except OSError as e:
            raise InputError(f"model.init {uri!r}: cannot download version {version} of {name!r} from {shown}: "
                             f"{e}") from None
        if not local.is_file():
            raise InputError(f"model.init {uri!r}: the checkpoint artifact of version {version} of {name!r} "
                             f"is not a file ({rel})")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        dest = workdir / f"{safe}-v{version}.pt"
        os.replace(local, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_init(
    uri: str,
    *,
    tracking_uri: str,
    s3_endpoint_url: str | None,
    workdir: Path,
    sha256: str | None = None,
) -> Path:
    """The local path of the checkpoint that ``model.init`` names (see the module docstring).

    Args:
        uri: a checkpoint path, ``file://``, ``s3://bucket/key`` / ``https://`` or
            ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``.
        tracking_uri: the MLflow store holding the registry (``mlflow.tracking_uri``;
            ``MLFLOW_TRACKING_URI`` wins, as everywhere in the pipeline).
        s3_endpoint_url: the S3 endpoint (``data.s3.endpoint_url``; None: AWS or the environment).
        workdir: where downloads go (created if missing): ``workdir/<key's basename>`` for S3/HTTP
            (kept and reused while it matches ``sha256``), ``workdir/<NAME>-v<VERSION>.pt`` for
            the registry (the alias resolved to its version).
        sha256: ``model.init_sha256``; required for s3/http(s), checked for the others when given.

    Raises:
        MissingFileError: a local checkpoint (or the SQLite MLflow store) does not exist.
        InputError: no ``sha256`` for a remote file, a checksum mismatch, an unknown registry
            model/alias/version, a registered model that is not an FSSD pyfunc, a bad URI.
        pipeline.download.DownloadError: a remote file could not be fetched.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InputError(f"model.init must be a checkpoint path, s3:// URI or models:/NAME@ALIAS, got {uri!r}")
    uri = uri.strip()
    workdir = Path(workdir)

    if uri.startswith("models:/"):
        m = REGISTRY_URI.match(uri)
        if not m:
            raise InputError(
                f"model.init {uri!r} is not a registry URI this pipeline reads; use models:/NAME@ALIAS "
                "(e.g. models:/fssd-coco2017@champion) or models:/NAME/VERSION"
            )
        path = _from_registry(uri, m["name"], m["alias"], m["version"], tracking_uri, workdir)
        _check_sha256(path, sha256, uri)
        return path

    if uri.startswith(_REMOTE):
        if sha256 is None:
            raise InputError(
                f"model.init {_redact(uri)!r} is a remote file, so set model.init_sha256 to its SHA-256 "
                "(`sha256sum FILE` of a trusted copy, or `aws s3 cp` it and hash it); remote files are verified"
            )
        from .download import Source, fetch

        source = Source(url=uri, sha256=sha256, md5=None, extract=False)
        return Path(fetch(source, workdir, s3_endpoint_url=s3_endpoint_url)).resolve()

    if "://" in uri and not uri.startswith("file://"):
        raise InputError(
            f"model.init {_redact(uri)!r}: unsupported scheme; give a checkpoint path, s3://bucket/key "
            "(with model.init_sha256) or models:/NAME@ALIAS"
        )
    path = Path(unquote(urlsplit(uri).path)) if uri.startswith("file://") else Path(uri)
    path = path.expanduser().resolve()
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise MissingFileError(
            f"model.init {uri!r}: {path} {what}; give an FSSD checkpoint (the models/fssd.pt a training run "
            "writes), s3://bucket/key with model.init_sha256, or models:/NAME@ALIAS from the MLflow registry"
        )
    _check_sha256(path, sha256, uri)
    return path
