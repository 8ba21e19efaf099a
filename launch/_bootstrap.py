"""Makes a plain checkout runnable: `python launch/train.py ...` without installing the package.

Python puts the script's folder (launch/) on sys.path, not the repository root; every launch/
script imports this module first (when run as a program) to put the root there, so `scaleinv_dist`
is the checkout's own. An installed package (`pip install -e .`) works the same way.
"""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
