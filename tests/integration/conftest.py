"""Fixtures the end-to-end modules share (each module that uses one gets its own, module-scoped)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.containerd_env import PrivateContainerd
from tests.integration import ctr


@pytest.fixture(scope="module")
def containerd_env(suite_dir: Path, image_dir: Path) -> Iterator[tuple[PrivateContainerd, Path]]:
    """A private containerd of the module's own (UVMs in the suite's run directory) and a busybox rootfs."""
    yield from ctr.containerd_env(suite_dir, image_dir)
