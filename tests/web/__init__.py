"""Tests of tm_sidecar/web/."""
