"""Shared fixtures for the data tests: one local Ray for the whole session, small specs."""

from __future__ import annotations

import pytest



@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every test that needs it (starting Ray takes seconds)."""
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray
    if started_here:
        ray.shutdown()
