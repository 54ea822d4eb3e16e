"""Make tests/ importable (shared helpers such as launch.py) and keep native threads modest."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "2")
