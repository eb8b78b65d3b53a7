"""The sample schema: one parquet row per user time window, in one place.

Column names follow TorchEasyRec's rule for grouped sequence features: the field `x` of
sequence `S` lives in column `S__x` (two underscores). Two sequences per row:

- `uih_seq`: the user's interaction history (UIH), oldest first;
- `cand_seq`: the window's candidates, oldest first, with their labels.

Every column of one sequence has the same length in a row. Timestamps are int64 seconds
everywhere (never rounded through float32). `sample_id` is unique per row so that a run can
account for every sample it delivered.
"""

from __future__ import annotations

import pyarrow as pa

from hstu.config.features import FeatureSpec, LabelSpec

UIH = "uih_seq"
CAND = "cand_seq"
SEP = "__"

SAMPLE_ID = "sample_id"
USER_ID = "user_id"
# Categorical user profile columns, re-coded to dense 1-based ints (0 = unknown user).
PROFILE_COLUMNS = (
    "user_active_degree",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
)

UIH_VIDEO_ID = "uih_seq__video_id"
UIH_ACTION_WEIGHT = "uih_seq__action_weight"
UIH_WATCH_TIME = "uih_seq__watch_time"
UIH_ACTION_TIMESTAMP = "uih_seq__action_timestamp"
CAND_VIDEO_ID = "cand_seq__video_id"
CAND_QUERY_TIME = "cand_seq__query_time"
# Labels, aligned with the candidates.
CAND_ACTION_WEIGHT = "cand_seq__action_weight"
CAND_WATCH_TIME = "cand_seq__watch_time"

# MTGR extras: item side info on both sides, user x item cross features on the candidate side.
UIH_VIDEO_CATE1 = "uih_seq__video_cate1"
UIH_VIDEO_CATE2 = "uih_seq__video_cate2"
CAND_VIDEO_CATE1 = "cand_seq__video_cate1"
CAND_VIDEO_CATE2 = "cand_seq__video_cate2"
CAND_USER_VIDEO_CROSS1 = "cand_seq__user_video_cross1"
CAND_USER_VIDEO_CROSS2 = "cand_seq__user_video_cross2"

INT_LIST = pa.list_(pa.int64())
FLOAT_LIST = pa.list_(pa.float32())

BASE_FIELDS: tuple[pa.Field, ...] = (
    pa.field(SAMPLE_ID, pa.int64(), nullable=False),
    pa.field(USER_ID, pa.int64(), nullable=False),
    *(pa.field(name, pa.int64(), nullable=False) for name in PROFILE_COLUMNS),
    pa.field(UIH_VIDEO_ID, INT_LIST, nullable=False),
    pa.field(UIH_ACTION_WEIGHT, INT_LIST, nullable=False),
    pa.field(UIH_WATCH_TIME, FLOAT_LIST, nullable=False),
    pa.field(UIH_ACTION_TIMESTAMP, INT_LIST, nullable=False),
    pa.field(CAND_VIDEO_ID, INT_LIST, nullable=False),
    pa.field(CAND_QUERY_TIME, INT_LIST, nullable=False),
    pa.field(CAND_ACTION_WEIGHT, INT_LIST, nullable=False),
    pa.field(CAND_WATCH_TIME, FLOAT_LIST, nullable=False),
)
MTGR_FIELDS: tuple[pa.Field, ...] = tuple(
    pa.field(name, INT_LIST, nullable=False)
    for name in (
        UIH_VIDEO_CATE1,
        UIH_VIDEO_CATE2,
        CAND_VIDEO_CATE1,
        CAND_VIDEO_CATE2,
        CAND_USER_VIDEO_CROSS1,
        CAND_USER_VIDEO_CROSS2,
    )
)

# Action bitmask (KuaiRand event -> bit), the same bits as Meta's and TorchEasyRec's tasks.
ACTION_BITS: dict[str, int] = {
    "is_click": 1,
    "is_like": 2,
    "is_follow": 4,
    "is_comment": 8,
    "is_forward": 16,
    "is_hate": 32,
    "long_view": 64,
    "is_profile_enter": 128,
}

# Cross features are log2 buckets of a count: 0 = unknown item, 1 = count 0, 2 = count 1,
# 3 = counts 2-3, 4 = counts 4-7, ... capped at CROSS_MAX_CODE.
CROSS_MAX_CODE = 15


def sample_schema(mtgr: bool = False) -> pa.Schema:
    """The schema `prepare` writes: base columns, plus the MTGR extras when `mtgr`."""
    return pa.schema(BASE_FIELDS + (MTGR_FIELDS if mtgr else ()))


def split_column(column: str) -> tuple[str | None, str]:
    """'uih_seq__video_id' -> ('uih_seq', 'video_id'); 'user_id' -> (None, 'user_id')."""
    sequence, sep, field = column.partition(SEP)
    return (sequence, field) if sep else (None, column)


def make_sample_ids(user_ids, window_indices):
    """sample_id = user_id * 2**20 + window index: unique per (user, window) and readable.

    Works on numpy int64 arrays. The caller checks user_id < 2**43 and window < 2**20.
    """
    return user_ids * (1 << 20) + window_indices


MAX_USER_ID_FOR_SAMPLE_ID = 1 << 43
# Profile table sizes in the KuaiRand recipes: the distinct values of each column in KuaiRand's
# user features file, coded 1..K by `prepare kuairand`, plus row 0 for an unknown user.
RECIPE_PROFILE_BUCKETS = {
    "user_active_degree": 10,
    "follow_user_num_range": 9,
    "fans_user_num_range": 10,
    "friend_user_num_range": 8,
    "register_days_range": 9,
}
MAX_WINDOWS_PER_USER = 1 << 20
# The recipes' sequence_delim, for sequence columns stored as strings ("12|884|93").
RECIPE_SEQUENCE_DELIM = "|"


def sample_specs(
    mtgr: bool = False,
    *,
    embedding_dim: int = 32,
    id_buckets: int | None = 10_000_000,
    profile_buckets: dict[str, int | None] | None = None,
    cate_buckets: tuple[int | None, int | None] = (1024, 4096),
    cross_buckets: int | None = CROSS_MAX_CODE + 1,
) -> tuple[list[FeatureSpec], list[LabelSpec]]:
    """Feature and label specs that read every column of `sample_schema(mtgr)`, with the
    table sizes of recipes/kuairand_dlrm_hstu.config and kuairand_mtgr.config by default.

    The training path derives its specs from a recipe (hstu.config.feature_specs); this is for
    tools that run without one: benchmarks, tests and `prepare`'s own check of what it wrote.
    A bucket count of None means "no table size to check".
    """
    if profile_buckets is None:
        profile_buckets = dict(RECIPE_PROFILE_BUCKETS)

    def id_spec(column: str, table: str, buckets: int | None) -> FeatureSpec:
        sequence = split_column(column)[0]
        return FeatureSpec(
            name=column,
            column=column,
            kind="id",
            sequence=sequence,
            embedding_name=table,
            embedding_dim=embedding_dim,
            num_buckets=buckets,
            # As feature_specs does: scalars keep the proto default (they are never split).
            sequence_delim=RECIPE_SEQUENCE_DELIM if sequence else ";",
        )

    def raw_spec(column: str, dtype: str, is_timestamp: bool = False) -> FeatureSpec:
        return FeatureSpec(
            name=column,
            column=column,
            kind="raw",
            sequence=split_column(column)[0],
            value_dtype=dtype,  # type: ignore[arg-type]
            is_timestamp=is_timestamp,
            sequence_delim=RECIPE_SEQUENCE_DELIM,
        )

    features = [id_spec(USER_ID, "user_id_emb", id_buckets)]
    features += [
        id_spec(name, f"{name}_emb", profile_buckets.get(name)) for name in PROFILE_COLUMNS
    ]
    features += [
        id_spec(UIH_VIDEO_ID, "video_id_emb", id_buckets),
        raw_spec(UIH_ACTION_WEIGHT, "int64"),
        raw_spec(UIH_WATCH_TIME, "float32"),
        raw_spec(UIH_ACTION_TIMESTAMP, "int64", is_timestamp=True),
        id_spec(CAND_VIDEO_ID, "video_id_emb", id_buckets),
        raw_spec(CAND_QUERY_TIME, "int64", is_timestamp=True),
    ]
    if mtgr:
        features += [
            id_spec(UIH_VIDEO_CATE1, "video_cate1_emb", cate_buckets[0]),
            id_spec(UIH_VIDEO_CATE2, "video_cate2_emb", cate_buckets[1]),
            id_spec(CAND_VIDEO_CATE1, "video_cate1_emb", cate_buckets[0]),
            id_spec(CAND_VIDEO_CATE2, "video_cate2_emb", cate_buckets[1]),
            id_spec(CAND_USER_VIDEO_CROSS1, "user_video_cross1_emb", cross_buckets),
            id_spec(CAND_USER_VIDEO_CROSS2, "user_video_cross2_emb", cross_buckets),
        ]
    labels = [
        LabelSpec(CAND_ACTION_WEIGHT, "int64", sequence_delim=RECIPE_SEQUENCE_DELIM),
        LabelSpec(CAND_WATCH_TIME, "float32", sequence_delim=RECIPE_SEQUENCE_DELIM),
    ]
    return features, labels
