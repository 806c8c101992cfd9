import sys
from pathlib import Path

# tests/ for the test helpers (`from digits import trained_mlp`), the repository root for the
# shared examples (`from examples.digits import digits_split`)
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
