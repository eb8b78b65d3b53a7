"""KuaiRand-27K-shaped synthetic samples with a signal a model can learn.

The world (fixed by the seed): items ranked by Zipf popularity; item i of popularity rank r
belongs to cluster r % K (video_cate1), has a tag inside its cluster (video_cate2), an author
and a hidden factor vector near its cluster's centroid. Each user has hidden factors near the
centroids of a few favourite clusters and a profile (codes derived partly from activity).

Each user's timeline: history items drawn from Zipf popularity, half of them steered to the
user's favourite clusters; strictly increasing int64-second timestamps with short in-session
gaps and long session gaps. Each interaction's actions come from one engagement score:

    score = user_factor . item_factor + item popularity bias
            + HISTORY_WEIGHT * (share of the user's last 64 clicked history items in the
              candidate's cluster)                           [candidates only]
    action a happens with probability sigmoid(b_a + w_a * (score + shared noise))

with b_a calibrated so each action's rate matches KuaiRand-like rates (click ~0.4, like ~0.02,
...). Watch time grows with the score; long_view marks the top 30% of watch ratios. A model
that ranks candidates with AUC well above 0.5 has learned the user, item and history terms.

Rows: one training window per user (history, then up to max_candidates candidates); a fraction
of users also get an eval window (their next candidates, the training window's candidates now
part of the history), mirroring the KuaiRand converter's split by time.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
from statistics import NormalDist

import numpy as np
import pyarrow.parquet as pq

from hstu.data import schema
from hstu.data.layout import RecipeLayout, apply_layout, layout_schema
from hstu.data.validate import validate_table
from hstu.data.windows import (
    Windows,
    cross_codes,
    histogram_labels,
    length_histogram,
    windows_to_table,
)

logger = logging.getLogger(__name__)

# Target rate of each action over all interactions (KuaiRand-27K-like).
ACTION_RATES: dict[str, float] = {
    "is_click": 0.4,
    "is_like": 0.02,
    "is_follow": 0.003,
    "is_comment": 0.005,
    "is_forward": 0.003,
    "is_hate": 0.002,
    "long_view": 0.3,
    "is_profile_enter": 0.01,
}
# How strongly each action follows the engagement score (hate follows it negatively).
ACTION_SLOPES: dict[str, float] = {
    "is_click": 1.6,
    "is_like": 2.0,
    "is_follow": 1.6,
    "is_comment": 1.6,
    "is_forward": 1.6,
    "is_hate": -1.6,
    "is_profile_enter": 1.4,
}
HISTORY_WEIGHT = 2.0
RECENT_CLICKS = 64
# Cardinalities of the synthetic profile columns (codes 1..n; the recipes' tables hold 8-9).
PROFILE_CARDINALITY = {
    "user_active_degree": 7,
    "follow_user_num_range": 8,
    "fans_user_num_range": 8,
    "friend_user_num_range": 7,
    "register_days_range": 7,
}
START_TIME = 1_649_376_000  # 2022-04-08 00:00:00 UTC, the start of KuaiRand's logs


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    users: int
    seed: int = 0
    # UIH cap. 7894 = 8000 - 6 contextual - 100 candidates: a row fits max_seq_len 8000.
    max_history: int = 7894
    median_history: int = 1000
    history_sigma: float = 1.1
    max_candidates: int = 100
    items: int = 1_000_000
    clusters: int = 200
    tags_per_cluster: int = 5
    authors: int = 100_000
    factor_dim: int = 8
    zipf_exponent: float = 1.05
    eval_fraction: float = 0.1
    mtgr: bool = False
    users_per_shard: int = 1000
    candidate_query_time: str = "window_start"  # or "own": see windows.CANDIDATE_QUERY_TIMES

    def __post_init__(self):
        if self.users < 1:
            raise ValueError(f"users must be >= 1, not {self.users}")
        if not 1 <= self.median_history <= self.max_history:
            raise ValueError("need 1 <= median_history <= max_history")
        if self.max_candidates < 1:
            raise ValueError("max_candidates must be >= 1")
        if not 0.0 <= self.eval_fraction <= 1.0:
            raise ValueError("eval_fraction must be in [0, 1]")
        if self.items < self.clusters:
            raise ValueError("need at least one item per cluster")


@dataclasses.dataclass
class World:
    """Everything about items, fixed by the seed; indexed by popularity rank."""

    item_id: np.ndarray  # rank -> video id (1..items, shuffled so ids don't reveal rank)
    item_factor: np.ndarray  # rank -> [d] float32
    item_bias: np.ndarray  # rank -> float32 (popular items are liked a little more)
    item_duration_ms: np.ndarray  # rank -> float32
    item_tag: np.ndarray  # rank -> video_cate2 code
    item_author: np.ndarray  # rank -> author id
    centroids: np.ndarray  # [clusters, d]


def make_world(options: SyntheticOptions) -> World:
    rng = np.random.default_rng([options.seed, 0])
    ranks = np.arange(options.items)
    weights = (ranks + 1.0) ** -options.zipf_exponent
    centroids = rng.normal(0.0, 1.0, (options.clusters, options.factor_dim)).astype(np.float32)
    cluster = ranks % options.clusters
    factor = centroids[cluster] + rng.normal(0.0, 0.6, (options.items, options.factor_dim))
    factor /= np.sqrt(options.factor_dim)
    tag_in_cluster = rng.integers(0, options.tags_per_cluster, options.items)
    return World(
        item_id=rng.permutation(options.items).astype(np.int64) + 1,
        item_factor=factor.astype(np.float32),
        item_bias=(0.3 * np.log(weights / weights.mean()) / np.log(options.items)).astype(
            np.float32
        ),
        item_duration_ms=np.exp(rng.normal(np.log(20_000.0), 0.7, options.items)).astype(
            np.float32
        ),
        item_tag=(cluster * options.tags_per_cluster + tag_in_cluster + 1).astype(np.int64),
        item_author=rng.integers(1, options.authors + 1, options.items).astype(np.int64),
        centroids=centroids,
    )


def zipf_ranks(rng: np.random.Generator, size: int, items: int, exponent: float) -> np.ndarray:
    """Popularity ranks 0..items-1 with P(rank r) ~ (r + 1) ** -exponent (exponent != 1), by
    inverting the CDF of the continuous power law on [1, items + 1): one formula per draw,
    no table lookup."""
    one_minus = 1.0 - exponent
    top = (items + 1.0) ** one_minus
    uniform = rng.random(size)
    ranks = np.floor((1.0 + uniform * (top - 1.0)) ** (1.0 / one_minus)).astype(np.int64) - 1
    return np.clip(ranks, 0, items - 1)


def generate_shard(options: SyntheticOptions, world: World, shard: int) -> dict:
    """Tables ("train", "eval") for users [shard * users_per_shard, ...), deterministic."""
    rng = np.random.default_rng([options.seed, 1, shard])
    first_user = shard * options.users_per_shard
    if not 0 <= first_user < options.users:
        raise ValueError(f"shard {shard} is past the last user ({options.users} users)")
    num_users = min(options.users_per_shard, options.users - first_user)
    user_ids = np.arange(first_user, first_user + num_users, dtype=np.int64) + 1

    # Users: favourite clusters, hidden factors near them, profile, timeline lengths.
    favourites = rng.integers(0, options.clusters, (num_users, 3))
    user_factor = world.centroids[favourites].mean(axis=1) + rng.normal(
        0.0, 0.5, (num_users, options.factor_dim)
    ).astype(np.float32)
    history_len = np.exp(
        rng.normal(np.log(options.median_history), options.history_sigma, num_users)
    )
    history_len = np.clip(np.round(history_len), 1, options.max_history).astype(np.int64)
    full = rng.random(num_users) < 0.8
    train_cands = np.where(
        full, options.max_candidates, rng.integers(1, options.max_candidates + 1, num_users)
    )
    has_eval = rng.random(num_users) < options.eval_fraction
    eval_cands = np.where(has_eval, rng.integers(1, options.max_candidates + 1, num_users), 0)
    timeline_len = history_len + train_cands + eval_cands
    users = {schema.USER_ID: user_ids, **_profiles(rng, history_len, options)}

    # Tokens: every user's whole timeline, flat, in time order.
    user_start = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(timeline_len, out=user_start[1:])
    num_tokens = int(user_start[-1])
    token_user = np.repeat(np.arange(num_users), timeline_len)
    position = np.arange(num_tokens) - user_start[token_user]
    rank = zipf_ranks(rng, num_tokens, options.items, options.zipf_exponent)
    steer = rng.random(num_tokens, dtype=np.float32) < 0.5
    favourite = favourites[token_user, rng.integers(0, 3, num_tokens, dtype=np.int8)]
    steered = rank - rank % options.clusters + favourite
    rank = np.where(steer & (steered < options.items), steered, rank)

    windows = _windows(user_start, history_len, train_cands, eval_cands, options.max_history)
    is_candidate = np.zeros(num_tokens, dtype=bool)
    is_candidate[position >= history_len[token_user]] = True

    # History actions follow the user and item terms; candidates add the history term.
    score = np.einsum("td,td->t", user_factor[token_user], world.item_factor[rank])
    score += world.item_bias[rank]
    action_weight = np.zeros(num_tokens, dtype=np.int64)
    watch_ratio = np.zeros(num_tokens, dtype=np.float32)
    history = ~is_candidate
    action_weight[history], watch_ratio[history] = _actions(rng, score[history])
    clicked = (action_weight & schema.ACTION_BITS["is_click"]) > 0
    affinity = _history_affinity(token_user, rank, history & clicked, is_candidate, options)
    score[is_candidate] += HISTORY_WEIGHT * affinity
    action_weight[is_candidate], watch_ratio[is_candidate] = _actions(rng, score[is_candidate])
    watch_time = (world.item_duration_ms[rank] * watch_ratio).astype(np.float32)

    session_gap = rng.random(num_tokens, dtype=np.float32) < 0.08
    gaps = rng.standard_exponential(num_tokens, dtype=np.float32) * np.where(
        session_gap, np.float32(3 * 3600.0), np.float32(25.0)
    )
    gaps = 1 + np.floor(gaps).astype(np.int64)  # strictly increasing seconds
    user_t0 = START_TIME + rng.integers(0, 14 * 86400, num_users)
    timestamp = np.cumsum(gaps)
    timestamp -= np.repeat(timestamp[user_start[:-1]] - gaps[user_start[:-1]], timeline_len)
    timestamp += user_t0[token_user]

    tokens = {
        "video_id": world.item_id[rank],
        "action_weight": action_weight,
        "watch_time": watch_time,
        "timestamp": timestamp,
    }
    if options.mtgr:
        tokens["video_cate1"] = (rank % options.clusters + 1).astype(np.int64)
        tokens["video_cate2"] = world.item_tag[rank]
        tokens["user_video_cross1"] = cross_codes(token_user, world.item_author[rank], windows)
        tokens["user_video_cross2"] = cross_codes(token_user, world.item_tag[rank], windows)

    tables = {}
    for split, is_eval in (("train", False), ("eval", True)):
        chosen = windows.select(windows.is_eval == is_eval)
        tables[split] = (windows_to_table(
            chosen,
            tokens,
            users,
            mtgr=options.mtgr,
            candidate_query_time=options.candidate_query_time,
        ), chosen)
    return tables


def _windows(
    user_start: np.ndarray,
    history_len: np.ndarray,
    train_cands: np.ndarray,
    eval_cands: np.ndarray,
    max_history: int,
) -> Windows:
    """One train window per user, plus an eval window for users with eval candidates."""
    num_users = len(history_len)
    begin = user_start[:-1]
    train_start = begin + history_len
    eval_start = train_start + train_cands
    has_eval = eval_cands > 0
    user_row = np.concatenate([np.arange(num_users), np.flatnonzero(has_eval)])
    cand_start = np.concatenate([train_start, eval_start[has_eval]])
    cand_end = np.concatenate([eval_start, (eval_start + eval_cands)[has_eval]])
    is_eval = np.repeat([False, True], [num_users, int(has_eval.sum())])
    return Windows(
        user_row=user_row,
        window_index=is_eval.astype(np.int64),
        uih_start=np.maximum(begin[user_row], cand_start - max_history),
        cand_start=cand_start,
        cand_end=cand_end,
        is_eval=is_eval,
    )


def _profiles(rng: np.random.Generator, history_len: np.ndarray, options) -> dict:
    """Profile codes 1..n; user_active_degree follows activity (history length) so that it
    carries a little signal, the others are skewed random draws."""
    profiles = {}
    for name, cardinality in PROFILE_CARDINALITY.items():
        if name == "user_active_degree":
            # Equal-probability bins of the activity distribution (fixed edges, so a user's
            # code does not depend on which shard it falls in); code 1 = most active.
            noise = 0.5
            activity = np.log(history_len) + rng.normal(0.0, noise, len(history_len))
            spread = NormalDist(
                math.log(options.median_history), math.hypot(options.history_sigma, noise)
            )
            edges = [spread.inv_cdf(q) for q in np.linspace(0, 1, cardinality + 1)[1:-1]]
            profiles[name] = (cardinality - np.searchsorted(edges, activity)).astype(np.int64)
        else:
            weights = 1.0 / np.arange(1, cardinality + 1)
            profiles[name] = rng.choice(
                np.arange(1, cardinality + 1), len(history_len), p=weights / weights.sum()
            ).astype(np.int64)
    return profiles


def _history_affinity(
    token_user: np.ndarray,
    rank: np.ndarray,
    clicked_history: np.ndarray,
    is_candidate: np.ndarray,
    options: SyntheticOptions,
) -> np.ndarray:
    """Per candidate token: the share of its user's last RECENT_CLICKS clicked history items
    that are in the candidate's cluster."""
    clusters = options.clusters
    num_users = int(token_user.max()) + 1 if len(token_user) else 0
    clicks = np.flatnonzero(clicked_history)
    users = token_user[clicks]
    clicks_per_user = np.bincount(users, minlength=num_users)
    click_end = np.cumsum(clicks_per_user)
    # Position of each click counted back from the user's latest click (0 = latest).
    from_end = click_end[users] - 1 - np.arange(len(clicks))
    recent = clicks[from_end < RECENT_CLICKS]
    counts = np.bincount(
        token_user[recent] * clusters + rank[recent] % clusters, minlength=num_users * clusters
    ).reshape(num_users, clusters)
    totals = np.maximum(counts.sum(axis=1), 1)
    candidates = np.flatnonzero(is_candidate)
    cand_user = token_user[candidates]
    return counts[cand_user, rank[candidates] % clusters] / totals[cand_user]


def _actions(rng: np.random.Generator, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bitmask per token from the score, and the watch ratio (watch time / duration)."""
    score = score.astype(np.float32)
    noisy = score + np.float32(0.5) * rng.standard_normal(len(score), dtype=np.float32)
    offsets = _calibrated_offsets(noisy, ACTION_SLOPES)
    action_weight = np.zeros(len(score), dtype=np.int64)
    for name, slope in ACTION_SLOPES.items():
        logit = np.float32(offsets[name]) + np.float32(slope) * noisy
        happens = rng.random(len(score), dtype=np.float32) < _sigmoid(logit)
        action_weight |= happens.astype(np.int64) * schema.ACTION_BITS[name]
    watch_ratio = np.exp(
        np.float32(0.6) * noisy
        + np.float32(np.log(0.5))
        + np.float32(0.6) * rng.standard_normal(len(score), dtype=np.float32)
    )
    long_view = watch_ratio >= np.quantile(watch_ratio, 1.0 - ACTION_RATES["long_view"])
    action_weight |= long_view.astype(np.int64) * schema.ACTION_BITS["long_view"]
    return action_weight, watch_ratio


def _calibrated_offsets(score: np.ndarray, slopes: dict[str, float]) -> dict[str, float]:
    """b_a such that mean(sigmoid(b_a + w_a * score)) == the action's target rate (bisection
    on a fixed subsample, so it is cheap and deterministic)."""
    sample = score[:: max(1, len(score) // 20_000)]
    offsets = {}
    for name, slope in slopes.items():
        low, high = -30.0, 30.0
        for _ in range(50):
            middle = (low + high) / 2
            if _sigmoid(middle + slope * sample).mean() < ACTION_RATES[name]:
                low = middle
            else:
                high = middle
        offsets[name] = (low + high) / 2
    return offsets


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _write_shard(
    options: SyntheticOptions, out_dir: str, shard: int, layout: RecipeLayout | None = None
) -> dict:
    """Generate and write one shard; returns what the manifest needs from it. With a layout
    the rows are written in the columns that recipe reads (hstu/data/layout.py) and checked
    as its training reads them."""
    world = _world_cache.get(options)
    if world is None:
        _world_cache.clear()
        world = _world_cache[options] = make_world(options)
    written = {}
    for split, (table, windows) in generate_shard(options, world, shard).items():
        if table.num_rows == 0:
            continue
        if layout is not None:
            table = apply_layout(table, layout)
            validate_table(table, list(layout.features), list(layout.labels))
        name = f"{split}/part-{shard:05d}.parquet"
        pq.write_table(table, os.path.join(out_dir, name), row_group_size=256)
        written[split] = {
            "file": name,
            "rows": table.num_rows,
            "uih_tokens": int(windows.uih_lengths.sum()),
            "candidate_tokens": int(windows.cand_lengths.sum()),
            "uih_hist": length_histogram(windows.uih_lengths),
            "cand_hist": length_histogram(windows.cand_lengths),
        }
    return written


def _gather(results, totals: dict, options: SyntheticOptions, started: float) -> None:
    for done, written in enumerate(results, start=1):
        for split, part in written.items():
            total = totals[split]
            for key in ("rows", "uih_tokens", "candidate_tokens"):
                total[key] += part[key]
            total["files"].append(part["file"])
            total["uih_hist"] += part["uih_hist"]
            total["cand_hist"] += part["cand_hist"]
        logger.info(
            "prepare synthetic: %d/%d users done (%.1f s)",
            min(done * options.users_per_shard, options.users),
            options.users,
            time.perf_counter() - started,
        )


# The world of the latest options, per process (a worker process makes it once).
_world_cache: dict[SyntheticOptions, World] = {}


def generate(
    options: SyntheticOptions,
    out_dir: str | os.PathLike,
    workers: int = 1,
    layout: RecipeLayout | None = None,
) -> dict:
    """Write train/ and eval/ parquet shards plus manifest.json under out_dir; returns the
    manifest. `workers` > 1 generates shards in that many processes (same output). `layout`
    (hstu.data.layout.plan_layout): write the columns a recipe reads instead of the sample
    schema."""
    if layout is not None and layout.needs_side_info and not options.mtgr:
        options = dataclasses.replace(options, mtgr=True)
    started = time.perf_counter()
    out_dir = os.fspath(out_dir)
    for split in ("train", "eval"):
        os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    num_shards = -(-options.users // options.users_per_shard)
    totals = {
        split: {
            "rows": 0,
            "uih_tokens": 0,
            "candidate_tokens": 0,
            "files": [],
            "uih_hist": np.zeros(len(histogram_labels()), np.int64),
            "cand_hist": np.zeros(len(histogram_labels()), np.int64),
        }
        for split in ("train", "eval")
    }
    calls = [(options, out_dir, shard, layout) for shard in range(num_shards)]
    if workers > 1 and num_shards > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = pool.map(_write_shard, *zip(*calls))
            _gather(results, totals, options, started)
    else:
        _gather((_write_shard(*call) for call in calls), totals, options, started)
    manifest = {
        "format": "hstu-samples/1",
        "source": "synthetic",
        "mtgr": options.mtgr,
        "options": dataclasses.asdict(options),
        "schema": (
            {f.name: str(f.type) for f in schema.sample_schema(options.mtgr)}
            if layout is None
            else dict(layout_schema(layout))
        ),
        "layout": None if layout is None else layout.describe(),
        "splits": {
            split: {
                "rows": t["rows"],
                "uih_tokens": t["uih_tokens"],
                "candidate_tokens": t["candidate_tokens"],
                "tokens": t["uih_tokens"] + t["candidate_tokens"],
                "files": t["files"],
                "length_histogram": {
                    "bins": histogram_labels(),
                    "uih": t["uih_hist"].tolist(),
                    "candidates": t["cand_hist"].tolist(),
                },
            }
            for split, t in totals.items()
        },
        "users": options.users,
        "bad_rows": {"rows": 0, "by_reason": {}},
        "seconds": round(time.perf_counter() - started, 2),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest
