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
