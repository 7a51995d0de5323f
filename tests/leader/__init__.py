"""Tests of tm_sidecar/leader/."""
