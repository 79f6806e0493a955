"""Shared argument handling for the examples: a model directory (default: the stories260K test
model in ../shared) and an optional text file."""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DEFAULT_MODEL = SHARED / "models" / "stories260K"
#: TinyStories text (the domain of stories260K) when ../shared has it; else the built-in text.
DEFAULT_TEXT = SHARED / "text" / "tinystories_sample.txt"


def parse_args(description: str, **extra: dict) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model_dir", nargs="?", type=Path, default=DEFAULT_MODEL,
                        help=f"full-precision mlx-lm model directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--text", type=Path,
                        default=DEFAULT_TEXT if DEFAULT_TEXT.is_file() else None,
                        help="plain-text file for calibration/evaluation "
                             f"(default: {DEFAULT_TEXT} if present, else the built-in text)")
    for flag, kwargs in extra.items():
        parser.add_argument(flag, **kwargs)
    return parser.parse_args()
