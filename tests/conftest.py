"""Make tests/ importable (shared helpers such as launch.py), keep native threads modest, and the
fixtures several test folders share."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

# the image check's cache (hvd_largebatch.data.check) of this test session, not the user's
if "HVD_LARGEBATCH_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HVD_LARGEBATCH_CACHE"] = tempfile.mkdtemp(prefix="hvd-largebatch-tests-")
    atexit.register(shutil.rmtree, os.environ["HVD_LARGEBATCH_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's digits as an 8x8-pixel image folder (``train/``, ``val/``, file lists),
    written once per session; tests that change files work on a copy."""
    from hvd_largebatch.data import write_digits_folder

    root = tmp_path_factory.mktemp("digits") / "d"
    write_digits_folder(str(root), size=8)
    return root
