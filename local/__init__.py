"""The moi client: audio in and out, meters, VAD, the pipeline, engines, CLI and views."""
