"""Tests of tm_sidecar/node/."""
