"""Tests of cloud/, one file per area."""
