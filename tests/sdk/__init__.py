"""Tests of the SDK (sdk/taskmanager, sdk/js) against real sidecars."""
