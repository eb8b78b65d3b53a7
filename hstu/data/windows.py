"""Turning per-user interaction timelines into user-window samples (shared by the KuaiRand
converter and the synthetic generator).

Interactions ("tokens") are flat arrays sorted by (user, time). A window is four indices into
them: candidates [cand_start, cand_end) and history [uih_start, uih_end), with
uih_end == cand_start. All work is numpy over whole arrays; no Python loop over users.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pyarrow as pa

from hstu.data import schema

# Length histogram bins for manifests: [0], [1], [2,3], [4,7], ... (powers of two).
HISTOGRAM_EDGES = [0, 1] + [2**k for k in range(1, 15)] + [2**62]


@dataclasses.dataclass
class Windows:
    """One entry per sample row; indices are into the flat token arrays."""

    user_row: np.ndarray  # index into the per-user arrays
    window_index: np.ndarray  # per user, 0, 1, ... (part of sample_id)
    uih_start: np.ndarray
    cand_start: np.ndarray
    cand_end: np.ndarray
    is_eval: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.user_row)

    @property
    def uih_lengths(self) -> np.ndarray:
        return self.cand_start - self.uih_start

    @property
    def cand_lengths(self) -> np.ndarray:
        return self.cand_end - self.cand_start

    def select(self, rows: np.ndarray | slice) -> Windows:
        return Windows(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def ranges_to_indices(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenation of arange(start, end) over all ranges, and the int64 offsets [n+1]."""
    lengths = (ends - starts).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    # Each element is its range's start plus its position within the range.
    indices = np.arange(total, dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    return indices, offsets


def plan_windows(
    user_starts: np.ndarray,
    user_ends: np.ndarray,
    eval_starts: np.ndarray,
    *,
    max_candidates: int,
    max_history: int,
    min_history: int = 0,
) -> tuple[Windows, np.ndarray]:
    """Consecutive windows of at most `max_candidates` candidates per user.

    user u owns tokens [user_starts[u], user_ends[u]); tokens from eval_starts[u] on are in
    the eval period. Each period is cut into windows from its beginning, so no window mixes
    periods and the last window of a period may be short. The first `min_history` tokens of a
    user are history only. A window's history is every earlier token of the user, the most
    recent `max_history` of them (eval windows see the train period as history).

    Returns the windows, sorted by (user, time), and the number of history-only tokens per user.
    """
    first = user_starts + np.minimum(min_history, user_ends - user_starts)
    eval_starts = np.clip(eval_starts, first, user_ends)
    segments_start = np.concatenate([first, eval_starts])
    segments_end = np.concatenate([eval_starts, user_ends])
    segment_user = np.concatenate([np.arange(len(user_starts))] * 2)
    segment_is_eval = np.repeat([False, True], len(user_starts))
    counts = -(-(segments_end - segments_start) // max_candidates)  # ceil division
    # Segments in (user, period) order so windows come out sorted by (user, time).
    order = np.lexsort((segment_is_eval, segment_user))
    segments_start, segments_end = segments_start[order], segments_end[order]
    segment_user, segment_is_eval, counts = (
        segment_user[order],
        segment_is_eval[order],
        counts[order],
    )

    window_segment = np.repeat(np.arange(len(counts)), counts)
    segment_offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=segment_offsets[1:])
    position = np.arange(len(window_segment)) - segment_offsets[window_segment]
    cand_start = segments_start[window_segment] + position * max_candidates
    cand_end = np.minimum(cand_start + max_candidates, segments_end[window_segment])
    user_row = segment_user[window_segment]
    uih_start = np.maximum(user_starts[user_row], cand_start - max_history)
    # Window index per user: position among the user's windows.
    user_window_counts = np.bincount(user_row, minlength=len(user_starts))
    user_first_window = np.zeros(len(user_starts) + 1, dtype=np.int64)
    np.cumsum(user_window_counts, out=user_first_window[1:])
    window_index = np.arange(len(user_row)) - user_first_window[user_row]
    windows = Windows(
        user_row=user_row,
        window_index=window_index,
        uih_start=uih_start,
        cand_start=cand_start,
        cand_end=cand_end,
        is_eval=segment_is_eval[window_segment],
    )
    return windows, first - user_starts


def log2_bucket(counts: np.ndarray) -> np.ndarray:
    """Cross-feature code of a count: 1 for 0, 2 for 1, 3 for 2-3, 4 for 4-7, ... (that is
    2 + floor(log2(count))), capped at CROSS_MAX_CODE. Code 0 is left for unknown items."""
    counts = counts.astype(np.int64)
    codes = 2 + np.floor(np.log2(np.maximum(counts, 1))).astype(np.int64)
    return np.minimum(np.where(counts == 0, 1, codes), schema.CROSS_MAX_CODE)


def counts_before(
    token_user: np.ndarray,
    token_key: np.ndarray,
    query_token: np.ndarray,
    query_before: np.ndarray,
) -> np.ndarray:
    """For each query q: how many tokens of the same user as token query_token[q], with the
    same key, lie before token index query_before[q]. Keys <= 0 mean unknown and count 0.

    Tokens must be sorted by (user, time) so that "before" is an index comparison.
    """
    num_tokens = len(token_user)
    if num_tokens == 0 or len(query_token) == 0:
        return np.zeros(len(query_token), dtype=np.int64)
    # Dense key codes keep user * num_keys + key inside int64 for any id range.
    unique_keys, key_code = np.unique(token_key, return_inverse=True)
    pair = token_user.astype(np.int64) * len(unique_keys) + key_code.reshape(-1)
    known = token_key > 0
    unique_pairs, group = np.unique(pair[known], return_inverse=True)
    stride = num_tokens + 1
    # Sorted (group, token index): the tokens of one group form a run, in time order.
    combined = np.sort(group.reshape(-1).astype(np.int64) * stride + np.flatnonzero(known))

    query_pair = pair[query_token]
    position = np.searchsorted(unique_pairs, query_pair)
    clipped = np.minimum(position, max(len(unique_pairs) - 1, 0))
    found = (
        (position < len(unique_pairs))
        & (token_key[query_token] > 0)
        & (unique_pairs[clipped] == query_pair if len(unique_pairs) else False)
    )
    low = np.searchsorted(combined, clipped * stride)
    high = np.searchsorted(combined, clipped * stride + query_before)
    return np.where(found, high - low, 0)


# A list column's offsets are int32 (the sample schema's list<...> type, not large_list).
MAX_LIST_VALUES = np.iinfo(np.int32).max


def list_column(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> column from flat values and int64 offsets [rows + 1]."""
    total = int(offsets[-1]) if len(offsets) else 0
    if total > MAX_LIST_VALUES:
        # Cast to int32, the offsets would wrap around and corrupt the column.
        raise ValueError(
            f"{total:,} values in one list column of one table: more than a list column's "
            f"int32 offsets hold ({MAX_LIST_VALUES:,}); write fewer rows per file "
            "(prepare synthetic: a smaller --users-per-shard or --max-history)"
        )
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type)
    )


# How a window's candidates get their query time (cand_seq__query_time).
# - window_start: all candidates share the time of the window's first interaction. The model
#   measures every token's age from the row's last query time and gives all candidates one
#   position, so with a shared query time a candidate's score depends on nothing but the
#   contextual tokens, the history and the candidate itself: adding, removing or reordering the
#   window's other candidates leaves it unchanged, exactly as at serving time, where all
#   candidates of a request share the request time.
# - own: each candidate keeps its own interaction time; the hour/day features of the
#   postprocessor are then exact per candidate, but the row's time anchor (its last candidate's
#   time) moves with the window's other candidates, so training rows are not candidate-isolated.
CANDIDATE_QUERY_TIMES = ("window_start", "own")


def windows_to_table(
    windows: Windows,
    tokens: dict[str, np.ndarray],
    users: dict[str, np.ndarray],
    *,
    mtgr: bool,
    candidate_query_time: str = "window_start",
) -> pa.Table:
    """Sample rows for `windows`.

    candidate_query_time: "window_start" (default) gives every candidate of a window the time
        of the window's first interaction, the moment its request was served; "own" gives each
        candidate its own interaction time. See CANDIDATE_QUERY_TIMES.

    tokens: flat per-token arrays: video_id, action_weight, watch_time, timestamp, and for
        MTGR video_cate1, video_cate2, user_video_cross1, user_video_cross2 (the cross codes
        already computed per candidate token for its window).
    users: per-user arrays: user_id and the profile columns.
    """
    uih_index, uih_offsets = ranges_to_indices(windows.uih_start, windows.cand_start)
    cand_index, cand_offsets = ranges_to_indices(windows.cand_start, windows.cand_end)
    user_ids = users[schema.USER_ID][windows.user_row]
    if len(user_ids) and (
        user_ids.max() >= schema.MAX_USER_ID_FOR_SAMPLE_ID
        or windows.window_index.max() >= schema.MAX_WINDOWS_PER_USER
    ):
        raise ValueError("user_id >= 2**43 or >= 2**20 windows per user: sample_id overflows")
    int64, float32 = pa.int64(), pa.float32()

    def uih(name: str, value_type: pa.DataType) -> pa.Array:
        return list_column(tokens[name][uih_index], uih_offsets, value_type)

    def cand(name: str, value_type: pa.DataType) -> pa.Array:
        return list_column(tokens[name][cand_index], cand_offsets, value_type)

    columns: dict[str, pa.Array] = {
        schema.SAMPLE_ID: pa.array(schema.make_sample_ids(user_ids, windows.window_index)),
        schema.USER_ID: pa.array(user_ids, int64),
    }
    for name in schema.PROFILE_COLUMNS:
        columns[name] = pa.array(users[name][windows.user_row], int64)
    columns[schema.UIH_VIDEO_ID] = uih("video_id", int64)
    columns[schema.UIH_ACTION_WEIGHT] = uih("action_weight", int64)
    columns[schema.UIH_WATCH_TIME] = uih("watch_time", float32)
    columns[schema.UIH_ACTION_TIMESTAMP] = uih("timestamp", int64)
    columns[schema.CAND_VIDEO_ID] = cand("video_id", int64)
    if candidate_query_time == "window_start":
        first = tokens["timestamp"][windows.cand_start]
        query_times = np.repeat(first, windows.cand_end - windows.cand_start)
        columns[schema.CAND_QUERY_TIME] = list_column(query_times, cand_offsets, int64)
    elif candidate_query_time == "own":
        columns[schema.CAND_QUERY_TIME] = cand("timestamp", int64)
    else:
        raise ValueError(
            f"candidate_query_time must be one of {CANDIDATE_QUERY_TIMES}, "
            f"not {candidate_query_time!r}"
        )
    columns[schema.CAND_ACTION_WEIGHT] = cand("action_weight", int64)
    columns[schema.CAND_WATCH_TIME] = cand("watch_time", float32)
    if mtgr:
        columns[schema.UIH_VIDEO_CATE1] = uih("video_cate1", int64)
        columns[schema.UIH_VIDEO_CATE2] = uih("video_cate2", int64)
        columns[schema.CAND_VIDEO_CATE1] = cand("video_cate1", int64)
        columns[schema.CAND_VIDEO_CATE2] = cand("video_cate2", int64)
        columns[schema.CAND_USER_VIDEO_CROSS1] = cand("user_video_cross1", int64)
        columns[schema.CAND_USER_VIDEO_CROSS2] = cand("user_video_cross2", int64)
    return pa.Table.from_pydict(columns, schema=schema.sample_schema(mtgr))


def cross_codes(
    token_user: np.ndarray,
    token_key: np.ndarray,
    windows: Windows,
) -> np.ndarray:
    """Per token: the log2-bucketed count of the user's interactions with the same key before
    the start of the window in which the token is a candidate (0 for unknown keys).

    Every token is a candidate in at most one window; tokens that are candidates in none
    (history only) get 0.
    """
    cand_index, _ = ranges_to_indices(windows.cand_start, windows.cand_end)
    window_of = np.repeat(np.arange(len(windows)), windows.cand_lengths)
    counts = counts_before(token_user, token_key, cand_index, windows.cand_start[window_of])
    codes = np.zeros(len(token_user), dtype=np.int64)
    codes[cand_index] = np.where(token_key[cand_index] > 0, log2_bucket(counts), 0)
    return codes


def length_histogram(lengths: np.ndarray) -> list[int]:
    return np.histogram(lengths, bins=HISTOGRAM_EDGES)[0].astype(int).tolist()


def histogram_labels() -> list[str]:
    """'0', '1', '2-3', '4-7', ..., '16384+' for HISTOGRAM_EDGES."""
    labels = []
    for low, high in itertools.pairwise(HISTOGRAM_EDGES):
        if high == HISTOGRAM_EDGES[-1]:
            labels.append(f"{low}+")
        elif high - low == 1:
            labels.append(str(low))
        else:
            labels.append(f"{low}-{high - 1}")
    return labels
