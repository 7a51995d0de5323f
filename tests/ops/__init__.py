"""Tests of tm_sidecar/ops/."""
