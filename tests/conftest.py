"""Shared pytest fixtures: where the shared data lives, and float32 matmuls."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_root() -> pathlib.Path:
    """Return the shared folder: FASHION_MSA_SHARED, else beside the repository."""
    override = os.environ.get("FASHION_MSA_SHARED")
    return pathlib.Path(override) if override else REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def mvsa_dir() -> pathlib.Path:
    """The shared MVSA-Single copy; tests that use it skip when it is absent."""
    path = shared_root() / "data" / "mvsa_single"
    if not (path / "labelResultAll.txt").is_file():
        pytest.skip(f"MVSA-Single not found at {path}; set FASHION_MSA_SHARED")
    return path
