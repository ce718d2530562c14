import os
from pathlib import Path

import pytest
import torch

from helpers import REPO

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
