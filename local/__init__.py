"""The moi client: audio in and out, meters, VAD, the pipeline, engines, CLI and views."""

from pathlib import Path

SAMPLE = Path(__file__).parent / "assets" / "sample.flac"  # the bundled sample (`--input sample`)
