"""Tests of local/, one file per area."""
