"""Tests of tm_sidecar/admin/."""
