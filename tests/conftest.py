"""Make tests/ importable (shared helpers such as launch.py) and keep native threads modest."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")

# the image check's cache (hvd_largebatch.data.check) of this test session, not the user's
if "HVD_LARGEBATCH_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["HVD_LARGEBATCH_CACHE"] = tempfile.mkdtemp(prefix="hvd-largebatch-tests-")
    atexit.register(shutil.rmtree, os.environ["HVD_LARGEBATCH_CACHE"], ignore_errors=True)
