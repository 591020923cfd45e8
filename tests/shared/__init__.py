"""Tests of shared/, one file per area."""
