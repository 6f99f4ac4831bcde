"""Where the real test data lives: ``../shared/data`` beside the repository checkout."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
