import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The suite is the CPU suite, also on a GPU machine: every `ssdd` command it runs (in this process or a
# child) defaults to --device cpu. Tests that need a GPU are marked `cuda` and pass --device cuda.
os.environ["SSDD_DEVICE"] = "cpu"
# precision "auto" without calibration timing, and one choice on every machine; no cache in the home folder
os.environ["SSDD_AUTO_PRECISION"] = "fp32"
if "SSDD_CACHE_DIR" not in os.environ:
    os.environ["SSDD_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssdd-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SSDD_CACHE_DIR"], ignore_errors=True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA
