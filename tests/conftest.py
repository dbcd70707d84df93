"""Shared test setup: tests run as root on the real kernel."""

from __future__ import annotations

import os
import sys

import pytest

# Test helper modules (seed_container.py and friends) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config: pytest.Config) -> None:
    if os.geteuid() != 0:
        raise pytest.UsageError("packxd's tests need root: they use real namespaces and mounts")
