"""Tests of tm_sidecar/etcd/."""
