import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(
    os.environ.get("FSSD_REFERENCE", REPO.parent / "shared" / "reference" / "fssd300_voc_reference.pt")
)


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(scope="session")
def reference():
    """The authors' golden tensors (../shared/reference); tests skip where the file is absent."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference file {REFERENCE} is absent (it sits in ../shared/ beside the checkout in CI)")
    return torch.load(REFERENCE, weights_only=False)


def write_params(path: Path, data_root: Path, tmp: Path, space: dict | None = None, **overrides) -> Path:
    """A params.yaml for a tiny, fast run: lite preset at 96 px, batch 8, everything in ``tmp``;
    ``tune.space`` replaced by ``space`` when given."""
    import yaml

    from pipeline.params import apply_overrides

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    base = {
        "data.root": str(data_root),
        "model.input_size": 96,
        "model.fusion_channels": 16,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.loader_workers": 0,
        "train.val_every": 1,
        "train.warmup_epochs": 0.5,
        "train.storage_path": str(tmp / "ray_results" / "train"),
        "tune.storage_path": str(tmp / "ray_results" / "tune"),
        "mlflow.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    base.update(overrides)
    raw = apply_overrides(raw, base)
    if space is not None:
        raw["tune"]["space"] = space
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def make_params():
    """``make_params(path, data_root, tmp, space=None, **dotted_overrides)`` writes a tiny-run params.yaml."""
    return write_params


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A converted synthetic dataset: 32 train, 8 val, 8 test images, under <root>/processed."""
    from fssd.data.synthetic import generate_scenes
    from pipeline.convert import convert_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    generate_scenes(root / "raw" / "synthetic", 48, seed=0, split_fractions=(32 / 48, 8 / 48, 8 / 48), max_size=320)
    convert_dataset("synthetic", root / "raw", root / "processed", root, max_bad_fraction=0.0)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every test that needs Ray."""
    import ray

    from pipeline.train import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    init_ray()
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()`` gives a free TCP port on 127.0.0.1 (tests bind only to loopback)."""
    return _free_port


@pytest.fixture(scope="session")
def fake_aws_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses (dvc, Ray jobs) that talk to moto: credentials moto accepts and
    no real AWS configuration, so nothing can reach AWS."""
    empty = tmp_path_factory.mktemp("no-aws")
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(empty / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(empty / "credentials"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto's S3 server on a free 127.0.0.1 port, shared by the session: ``http://127.0.0.1:PORT``."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def _mlflow_server(store_uri: str, artifacts: Path, cwd: Path, env: dict[str, str] | None = None):
    port = _free_port()
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "server", "--backend-store-uri", store_uri,
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with {server.returncode}")
                time.sleep(1)
        else:
            raise RuntimeError(f"mlflow server on {base} did not answer /health in 180 s")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def mlflow_server():
    """``with mlflow_server(store_uri, artifacts_dir, cwd, env) as base_url:`` runs `mlflow server`
    on a free loopback port until the block ends."""
    return _mlflow_server
