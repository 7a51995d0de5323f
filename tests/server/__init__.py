"""Tests of tm_sidecar/server/."""
