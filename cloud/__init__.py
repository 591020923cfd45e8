"""Inference runners and the HTTP gateway; importable in-process (no Modal, no local/)."""
