import sys
from pathlib import Path

# tests import shared helpers (tiny_models) as plain modules
sys.path.insert(0, str(Path(__file__).parent))
