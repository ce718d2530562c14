import os
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


def write_params(path: Path, data_root: Path, tmp: Path, **overrides) -> Path:
    """A params.yaml for a tiny, fast run: lite preset at 96 px, batch 8, everything in ``tmp``."""
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
    path.write_text(yaml.safe_dump(apply_overrides(raw, base), sort_keys=False))
    return path


@pytest.fixture
def make_params():
    """``make_params(path, data_root, tmp, **dotted_overrides)`` writes a tiny-run params.yaml."""
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
