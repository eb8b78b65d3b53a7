"""Cached scoring for request streams: each user's history keys and values are kept between
requests (hstu/modules/kv_cache.py), so a request runs only its new actions and candidates
through the encoder.

    scorer = CachedServing(serving_module, CachePolicy(mode="exact", max_bytes=2 << 30))
    probs = scorer.score(inputs, keys=[user ids...])   # inputs: the program's input dict

A request is one row in the serving format (hstu/export/serving.py): the user's contextual
features, their WHOLE current history and the candidates. The scorer recognises that a row's
history extends the cached one (same contextual features, the cached history tokens
unchanged at its start, every history input compared) and then runs only the tokens after
it; any other change (a history cut at the front by a length cap, an edited action, new
contextual features) re-encodes the user from scratch. Rows of one user in one call are
scored in order, each against the cache the previous one left.

Modes (CachePolicy.mode):
- "exact": the cache is used only when `kv_cache.reuse_is_exact` says the scores equal a full
  pass: same history, same contextual features, and every cached token in the same position
  and time bucket (appending new actions is exact only without contextual tokens or with one
  layer, and without time encoding: not for this project's recipes). Otherwise the user is
  re-encoded (a full pass over the history) and the new cache replaces the old. Scores equal
  ServingModule's within float rounding, always.
- "incremental": new actions are appended to the cache without touching the cached tokens,
  which keep the positions, time buckets and contextual-token states of the pass that computed
  them. Scores differ from a full pass; the difference grows with the tokens appended and the
  time elapsed since the last full encode, so the cache is re-encoded once more than
  max_stale_tokens tokens were appended or the query time moved more than max_stale_seconds
  from it. docs/serving.md has the measured differences.

Memory: the store (kv_cache.KVCacheStore) is bounded by max_bytes, least recently used users
evicted first (their next request re-encodes them).

Devices: the keys and values live where the serving module's parameters are. Everything else
(splitting the request into rows, recognising a cached history, the sizes and position/time
indices of the new tokens) is worked out on a CPU copy of the request, and only the new tokens'
inputs travel to the device: on a GPU a request does not wait for the device until its scores
are read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch

from hstu.export.serving import LENGTHS_SUFFIX, ServingModule, lengths_key
from hstu.modules.kv_cache import (
    CacheEntry,
    KVCacheStore,
    cached_encode,
    copy_many,
    reuse_is_exact,
)
from hstu.modules.scoring import task_outputs

MODES = ("exact", "incremental")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    mode: str = "exact"
    max_bytes: int = 1 << 30
    # incremental mode: re-encode once more than this many tokens were appended since the
    # last full encode, or the query time moved more than this from that encode's.
    max_stale_tokens: int = 64
    max_stale_seconds: int = 3600

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"cache mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.max_bytes <= 0:
            raise ValueError(f"cache max_bytes must be > 0, got {self.max_bytes}")
        if self.max_stale_tokens < 0 or self.max_stale_seconds < 0:
            raise ValueError("cache max_stale_tokens and max_stale_seconds must be >= 0")


@dataclasses.dataclass
class CacheCounters:
    """What happened to each request (row) scored so far."""

    rows: int = 0
    encoded: int = 0  # full pass over the history (no entry, or reuse not allowed)
    reused_exact: int = 0  # cache used, scores equal a full pass
    reused_stale: int = 0  # cache used in incremental mode, scores approximate
    appended_tokens: int = 0  # history tokens run against a cache (not re-encoded)
    # why rows were encoded
    no_entry: int = 0
    history_changed: int = 0
    not_exact: int = 0
    too_stale: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _Row:
    key: Hashable
    features: dict[str, torch.Tensor]  # per feature: this row's values (scalars as [1])
    history: dict[str, torch.Tensor]  # the uih-sequence features' values
    contextual: torch.Tensor | None  # the contextual features' ids
    timestamps: torch.Tensor  # history timestamps, int64
    anchor: int  # the last candidate's query time
    num_candidates: int


class CachedServing:
    """Scores rows like ServingModule, with a per-user KV cache (see the module docstring)."""

    def __init__(self, serving: ServingModule, policy: CachePolicy | None = None) -> None:
        self.serving = serving.eval()
        # Where the model (and so the keys and values) lives: the new tokens go there.
        self.device = next(serving.parameters()).device
        self.policy = policy or CachePolicy()
        self.store = KVCacheStore(self.policy.max_bytes)
        self.counters = CacheCounters()
        groups = serving.groups
        if not groups["uih_timestamp"] or not groups["candidate_timestamp"]:
            raise ValueError(
                "cached scoring needs the uih_timestamp and candidate_timestamp groups")
        self.uih_features = [name for name, spec in serving.features.items()
                             if spec.sequence == serving.uih_sequence]
        # One feature per sequence, whose per-row length is that sequence's.
        self.first_feature: dict[str, str] = {}
        for name, spec in serving.features.items():
            if spec.sequence is not None:
                self.first_feature.setdefault(spec.sequence, name)
        self.timestamp_feature = groups["uih_timestamp"][0]
        self.query_time_feature = groups["candidate_timestamp"][0]
        encoder = serving.encoder
        self.contextual_seq_len = encoder.preprocessor.contextual_seq_len
        # Tokens the attention treats as contextual (they see the whole history): the STU's
        # contextual_seq_len may be set apart from the preprocessor's token count.
        self.bidirectional_tokens = max(
            [self.contextual_seq_len]
            + [layer.contextual_seq_len for layer in encoder.stu_stack.layers])

    # ---- public --------------------------------------------------------------------------

    @torch.no_grad()
    def score(
        self, inputs: Mapping[str, torch.Tensor], keys: Sequence[Hashable]
    ) -> dict[str, torch.Tensor]:
        """{task: [sum of candidates]} for the rows of `inputs` (ServingModule's input dict),
        `keys[b]` naming row b's user. Every row needs at least one candidate."""
        serving = self.serving
        batch = int(inputs[lengths_key(serving.candidate_sequence)].shape[0])
        if len(keys) != batch:
            raise ValueError(f"{len(keys)} keys for {batch} rows")
        # The bookkeeping reads the request on the host (a copy, when it came on a GPU).
        inputs = {name: value.cpu() for name, value in inputs.items()}
        if not serving.ascending:
            # Newest-first rows: reversing every tensor makes them oldest-first and reverses
            # the row order (as score_candidates does); the outputs are flipped back below.
            inputs = {name: value.flip(0) for name, value in inputs.items()}
            keys = list(keys)[::-1]
        rows = self._split_rows(inputs, keys)
        # Rows of one user are scored in order: the k-th row of every user goes in wave k.
        seen: dict[Hashable, int] = {}
        waves: list[list[int]] = []
        for index, row in enumerate(rows):
            wave = seen.get(row.key, 0)
            seen[row.key] = wave + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append(index)
        per_row: list[dict[str, torch.Tensor] | None] = [None] * batch
        for wave in waves:
            scores = self._score_wave([rows[i] for i in wave])
            for index, row_scores in zip(wave, scores):
                per_row[index] = row_scores
        tasks = serving.task_names
        out = {task: torch.cat([row_scores[task] for row_scores in per_row]) for task in tasks}
        if not serving.ascending:
            out = {task: value.flip(0) for task, value in out.items()}
        return out

    def summary(self) -> dict[str, object]:
        return {
            "mode": self.policy.mode,
            **self.counters.as_dict(),
            "cache_entries": self.store.stats.entries,
            "cache_bytes": self.store.stats.bytes,
            "cache_max_bytes": self.store.max_bytes,
            "evictions": self.store.stats.evictions,
            "rejected_entries": self.store.stats.rejected,
        }

    # ---- rows ----------------------------------------------------------------------------

    def _split_rows(self, inputs: Mapping[str, torch.Tensor], keys) -> list[_Row]:
        serving = self.serving
        offsets = {}
        for name, value in inputs.items():
            if name.endswith(LENGTHS_SUFFIX):
                lengths = value.to(torch.int64)
                offsets[name[: -len(LENGTHS_SUFFIX)]] = [0] + torch.cumsum(lengths, 0).tolist()
        rows = []
        contextual_names = serving.groups["contextual"]
        for b, key in enumerate(keys):
            features = {}
            for name, spec in serving.features.items():
                if spec.sequence is None:
                    features[name] = inputs[name][b:b + 1]
                else:
                    bounds = offsets[spec.sequence]
                    features[name] = inputs[name][bounds[b]:bounds[b + 1]]
            queries = features[self.query_time_feature]
            if queries.numel() == 0:
                raise ValueError(f"row {b} (key {key!r}) has no candidates; cached scoring "
                                 "needs at least one")
            contextual = (torch.cat([features[name] for name in contextual_names])
                          if contextual_names else None)
            rows.append(_Row(
                key=key,
                features=features,
                history={name: features[name] for name in self.uih_features},
                contextual=contextual,
                timestamps=features[self.timestamp_feature].to(torch.int64),
                anchor=int(queries[-1]),
                num_candidates=int(queries.numel()),
            ))
        return rows

    def _extends(self, entry: CacheEntry, row: _Row) -> bool:
        """Is row's history the cached one plus tokens at its end, with the same contextual
        features?"""
        n = entry.history_length
        if row.timestamps.numel() < n:
            return False
        # The entry keeps its signature on the CPU (small; the device holds keys and values).
        if (entry.contextual is None) != (row.contextual is None) or (
                row.contextual is not None
                and not torch.equal(entry.contextual, row.contextual.cpu())):
            return False
        return all(torch.equal(entry.signature[name], row.history[name][:n].cpu())
                   for name in self.uih_features)

    def _decide(self, row: _Row) -> CacheEntry | None:
        """The entry to score `row` against, or None to encode it from scratch."""
        entry = self.store.get(row.key)
        counters = self.counters
        if entry is None:
            counters.no_entry += 1
            return None
        if not self._extends(entry, row):
            counters.history_changed += 1
            return None
        new_tokens = int(row.timestamps.numel()) - entry.history_length
        exact = reuse_is_exact(self.serving.encoder, entry, new_tokens, row.anchor,
                               bidirectional_tokens=self.bidirectional_tokens)
        if exact:
            counters.reused_exact += 1
            return entry
        if self.policy.mode == "exact":
            counters.not_exact += 1
            return None
        stale_tokens = entry.stale_tokens + new_tokens
        drift = abs(row.anchor - entry.encoded_anchor)
        if stale_tokens > self.policy.max_stale_tokens or drift > self.policy.max_stale_seconds:
            counters.too_stale += 1
            return None
        counters.reused_stale += 1
        entry.exact = False
        return entry

    # ---- one wave: distinct users ---------------------------------------------------------

    def _score_wave(self, rows: list[_Row]) -> list[dict[str, torch.Tensor]]:
        serving = self.serving
        entries = [self._decide(row) for row in rows]
        self.counters.rows += len(rows)
        self.counters.encoded += sum(entry is None for entry in entries)
        starts = [0 if entry is None else entry.history_length for entry in entries]
        self.counters.appended_tokens += sum(
            int(row.timestamps.numel()) - start
            for row, start, entry in zip(rows, starts, entries) if entry is not None)

        # The new tokens' inputs, built on the host and sent to the device in one go.
        delta = {}
        for name, spec in serving.features.items():
            if spec.sequence == serving.uih_sequence:
                parts = [row.features[name][start:] for row, start in zip(rows, starts)]
            else:
                parts = [row.features[name] for row in rows]
            delta[name] = torch.cat(parts)
        history_lengths = [int(row.timestamps.numel()) - start for row, start in zip(rows, starts)]
        num_targets = [row.num_candidates for row in rows]
        for sequence, name in self.first_feature.items():
            lengths = history_lengths if sequence == serving.uih_sequence else num_targets
            delta[lengths_key(sequence)] = torch.tensor(lengths, dtype=torch.int64)
        if self.device.type == "cuda":
            delta = {name: value.pin_memory().to(self.device, non_blocking=True)
                     for name, value in delta.items()}
        else:
            delta = {name: value.to(self.device) for name, value in delta.items()}
        timestamps = [
            torch.cat([row.timestamps[start:],
                       row.features[self.query_time_feature].to(torch.int64)])
            for row, start in zip(rows, starts)
        ]
        encoder_inputs = serving.encoder_inputs(delta)
        encoding = cached_encode(serving.encoder, entries, history_lengths=history_lengths,
                                 candidate_counts=num_targets, timestamps=timestamps,
                                 **encoder_inputs)
        item = serving.item_tower(encoder_inputs["candidates"])
        per_task = serving.fusion_tower(encoding.candidates, item)
        probs = task_outputs(serving.tasks, per_task)[1]

        self._update_store(rows, entries, starts, encoding)
        out, start = [], 0
        for row in rows:
            end = start + row.num_candidates
            out.append({task: value[start:end] for task, value in probs.items()})
            start = end
        return out

    def _update_store(self, rows, entries, starts, encoding) -> None:
        offsets = encoding.prefix_offsets.tolist()
        single = len(rows) == 1
        # Every row's new keys and values are copied out of the batch tensors together, in
        # one multi-tensor copy (kv_cache.copy_many), not two copies per row and layer. The
        # copy runs even if a row fails half-way (the rows before it have made room for their
        # tokens), and entries enter the store only after it.
        targets, sources, updated = [], [], []
        try:
            for b, (row, entry, start) in enumerate(zip(rows, entries, starts)):
                lo, hi = offsets[b], offsets[b + 1]
                kv = [(k[lo:hi], v[lo:hi]) for k, v in encoding.prefix_kv]
                if entry is None:
                    if not single:
                        # Slices of a batch tensor would keep the whole batch alive: own
                        # (contiguous) buffers.
                        owned = [tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device)
                                       for t in pair) for pair in kv]
                        for own_pair, pair in zip(owned, kv):
                            targets += own_pair
                            sources += pair
                        kv = owned
                    entry = CacheEntry(
                        kv,
                        contextual_seq_len=self.contextual_seq_len,
                        history_timestamps=row.timestamps,
                        anchor=row.anchor,
                        contextual=row.contextual,
                        signature={name: row.history[name].clone()
                                   for name in self.uih_features},
                    )
                else:
                    more_targets, more_sources = entry.reserve(
                        kv, row.timestamps[start:],
                        {name: row.history[name][start:] for name in self.uih_features})
                    targets += more_targets
                    sources += more_sources
                    if entry.exact:
                        entry.anchor = row.anchor
                    else:
                        entry.stale_tokens += int(row.timestamps.numel()) - start
                updated.append((row.key, entry))
        finally:
            copy_many(targets, sources)
        for key, entry in updated:
            self.store.put(key, entry)


def load_serving_module(export_dir: str | Path) -> ServingModule:
    """The ServingModule of an export directory, rebuilt from its pipeline.config with the
    weights of its program (checked like Predictor checks them: manifest, sha256, no pickle).

    Cached scoring needs the model's modules, not only the traced program: the modules are
    built with hstu.model.DlrmHSTU (which imports TorchRec; its tables are made on the meta
    device, never allocated) and every parameter and buffer is taken from the program, by
    name; a name missing on either side is an error (a program exported by other code)."""
    from hstu.config.features import feature_specs, label_specs
    from hstu.config.loader import load_config_text
    from hstu.export import artifacts
    from hstu.model import DlrmHSTU
    from hstu.ops import Kernel

    export_dir = Path(export_dir)
    _, program = artifacts.open_export_dir(export_dir)
    config_path = export_dir / artifacts.CONFIG_FILE
    cfg = load_config_text(config_path.read_text(encoding="utf-8"), str(config_path))
    model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg),
                     embedding_device=torch.device("meta"))
    model.set_kernel(Kernel.PYTORCH)
    serving = ServingModule(model)
    state = program.state_dict
    expected = serving.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise artifacts.ExportDirError(
            f"{export_dir}: the program's weights do not fit the model its pipeline.config "
            f"builds (missing {missing[:5]}, unexpected {unexpected[:5]}); re-export with this "
            "version of the code")
    serving.load_state_dict(dict(state), strict=True, assign=True)
    serving.eval()
    _check_against_program(serving, program, export_dir)
    return serving


# Rows (history, candidates) the rebuilt modules are checked on against the program.
CHECK_LENGTHS = {"history": [5, 0, 9], "candidates": [2, 3, 1]}
CHECK_ATOL, CHECK_RTOL = 1e-5, 1e-4


def _check_against_program(serving: ServingModule, program, export_dir: Path) -> None:
    """The rebuilt modules must score like the exported program: the modules run this
    checkout's code, the program the code of export time, and the two may have drifted."""
    from hstu.export import artifacts
    from hstu.export.serving import (
        serving_inputs,
        synthetic_inputs,
        with_filler_row,
        without_filler_scores,
    )

    features = list(serving.features.values())
    timestamps = set(serving.groups["uih_timestamp"] + serving.groups["candidate_timestamp"])
    lengths = {serving.uih_sequence: CHECK_LENGTHS["history"],
               serving.candidate_sequence: CHECK_LENGTHS["candidates"]}
    inputs = synthetic_inputs(features, timestamps, serving.uih_sequence, lengths, seed=7)
    with torch.no_grad():
        expected = without_filler_scores(
            program.module()(with_filler_row(inputs, serving_inputs(features))))
        got = serving(inputs)
    for task, value in expected.items():
        if not torch.allclose(got[task], value, atol=CHECK_ATOL, rtol=CHECK_RTOL):
            worst = float((got[task] - value).abs().max())
            raise artifacts.ExportDirError(
                f"{export_dir}: the modules rebuilt from this checkout's code score task "
                f"{task!r} differently from the exported program (max difference {worst:.3g}); "
                "the model code changed since the export: re-export, or score uncached")
