"""Tests of tm_sidecar/core/."""
