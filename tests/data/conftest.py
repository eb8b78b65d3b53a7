"""Shared fixtures for the data tests: one local Ray for the whole session, and hand-built
specs and tables (`make_specs`, `make_table`)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from hstu.config.features import FeatureSpec, LabelSpec


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every test that needs it (starting Ray takes seconds)."""
    import ray
    import ray.data

    started_here = not ray.is_initialized()
    if started_here:
        # address="local": always a fresh local instance, never a cluster that RAY_ADDRESS or
        # a stale /tmp/ray/ray_current_cluster (left by another `ray start`) points at.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    yield ray
    if started_here:
        ray.shutdown()


def small_specs(
    num_buckets: int = 100, *, ascending: bool = True, delim: str = "|"
) -> tuple[list[FeatureSpec], list[LabelSpec]]:
    """A hand-built spec set: user_id scalar, a history of (video_id, action_timestamp,
    watch_time), candidates of (video_id, query_time) sharing the video table, two labels.
    `ascending`: the timestamps' order; `delim`: the separator of string-encoded sequences."""
    features = [
        FeatureSpec(
            "user_id",
            "user_id",
            "id",
            embedding_name="user",
            embedding_dim=4,
            num_buckets=num_buckets,
        ),
        FeatureSpec(
            "uih_seq__video_id",
            "uih_seq__video_id",
            "id",
            sequence="uih_seq",
            embedding_name="video",
            embedding_dim=4,
            num_buckets=num_buckets,
            sequence_delim=delim,
        ),
        FeatureSpec(
            "uih_seq__action_timestamp",
            "uih_seq__action_timestamp",
            "raw",
            sequence="uih_seq",
            value_dtype="int64",
            is_timestamp=True,
            timestamps_ascending=ascending,
            sequence_delim=delim,
        ),
        FeatureSpec(
            "uih_seq__watch_time",
            "uih_seq__watch_time",
            "raw",
            sequence="uih_seq",
            value_dtype="float32",
            sequence_delim=delim,
        ),
        FeatureSpec(
            "cand_seq__video_id",
            "cand_seq__video_id",
            "id",
            sequence="cand_seq",
            embedding_name="video",
            embedding_dim=4,
            num_buckets=num_buckets,
            sequence_delim=delim,
        ),
        FeatureSpec(
            "cand_seq__query_time",
            "cand_seq__query_time",
            "raw",
            sequence="cand_seq",
            value_dtype="int64",
            is_timestamp=True,
            timestamps_ascending=ascending,
            sequence_delim=delim,
        ),
    ]
    labels = [
        LabelSpec("cand_seq__action_weight", "int64", sequence_delim=delim),
        LabelSpec("cand_seq__watch_time", "float32", sequence_delim=delim),
    ]
    return features, labels


def small_table(**overrides) -> pa.Table:
    """Three rows that satisfy small_specs(); keyword arguments replace columns (python lists)."""
    ints = pa.list_(pa.int64())
    floats = pa.list_(pa.float32())
    columns = {
        "sample_id": (pa.int64(), [10, 11, 12]),
        "user_id": (pa.int64(), [1, 2, 3]),
        "uih_seq__video_id": (ints, [[5, 6], [], [7, 8, 9]]),
        "uih_seq__action_timestamp": (ints, [[100, 101], [], [200, 200, 205]]),
        "uih_seq__watch_time": (floats, [[1.5, 2.0], [], [0.0, 3.0, 4.5]]),
        "cand_seq__video_id": (ints, [[11], [12, 13], [14]]),
        "cand_seq__query_time": (ints, [[102], [50, 60], [206]]),
        "cand_seq__action_weight": (ints, [[3], [0, 64], [1]]),
        "cand_seq__watch_time": (floats, [[9.0], [0.5, 7.25], [1.0]]),
    }
    arrays = {}
    for name, (default_type, values) in columns.items():
        if name in overrides:
            value = overrides.pop(name)
            arrays[name] = (
                value
                if isinstance(value, (pa.Array, pa.ChunkedArray))
                else pa.array(value, type=default_type)
            )
        else:
            arrays[name] = pa.array(values, type=default_type)
    for name, value in overrides.items():  # extra columns
        arrays[name] = value if isinstance(value, pa.Array) else pa.array(value)
    return pa.table(arrays)


@pytest.fixture
def make_specs():
    return small_specs


@pytest.fixture
def make_table():
    return small_table
