"""Cached scoring (hstu/export/cached.py, hstu/modules/kv_cache.py) against full recomputation
(ServingModule, the same module the export traces) on request streams of the smoke model.

Every exact-mode score is compared with ServingModule's on the same request: first requests
(encode), repeated requests (cache reuse), new candidates, new actions, a moved query time,
edited histories, with contextual tokens, without them, with a window (max_attn_len), with no
history, with one candidate, newest-first rows, and the TRITON cached kernel. The incremental
mode's difference from full scores is measured and must stay within the tolerance that its
documentation states for this model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ATOL = 2e-6  # float32 rounding of a differently ordered sum; scores are in [0, 1]
HISTORY, CANDIDATES = 60, 5


def build_serving(overrides=(), *, drop_contextual=False, seed=0):
    from hstu.config import feature_specs, label_specs
    from hstu.config.loader import load_config_text
    from hstu.export.serving import ServingModule
    from hstu.model import DlrmHSTU

    text = (REPO_ROOT / "recipes" / "smoke.config").read_text()
    if drop_contextual:
        text, count = re.subn(r'feature_groups \{\s*group_name: "contextual".*?\n    \}\n', "",
                              text, flags=re.DOTALL)
        assert count == 1
    cfg = load_config_text(text, "smoke.config", overrides)
    torch.manual_seed(seed)
    model = DlrmHSTU(cfg, feature_specs(cfg), label_specs(cfg))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter.float()).to(parameter.dtype) * 0.05)
        # The random position and time tables are small next to x * sqrt(D); scaled up so that
        # a wrong position or bucket shows in the scores.
        model.encoder.positional_encoder.position_table.mul_(30)
        if model.encoder.positional_encoder.time_table is not None:
            model.encoder.positional_encoder.time_table.mul_(30)
    return ServingModule(model).eval()


class User:
    """A user's whole action log (ids, actions, watch times, timestamps) and profile, from
    which requests with the first n actions are cut."""

    def __init__(self, serving, user_id, seed, length=HISTORY):
        generator = torch.Generator().manual_seed(seed)
        self.serving = serving
        self.user_id = user_id
        self.video = torch.randint(0, 1000, (length,), generator=generator)
        self.action = torch.randint(0, 256, (length,), generator=generator)
        self.watch = torch.rand(length, generator=generator) * 100
        gaps = torch.randint(1, 3000, (length,), generator=generator)
        self.time = 1_650_000_000 + torch.cumsum(gaps, 0)
        self.profile = torch.randint(0, 5, (5,), generator=generator)

    def request(self, n, candidates, query_time=None, *, start=0):
        """One row: history actions [start, n), the given candidate ids, one query time (by
        default 10 minutes after the last action)."""
        if query_time is None:
            last = int(self.time[n - 1]) if n > 0 else 1_650_000_000
            query_time = last + 600
        candidates = torch.as_tensor(candidates, dtype=torch.int64)
        row = {
            "uih_seq__video_id": self.video[start:n],
            "uih_seq__action_weight": self.action[start:n],
            "uih_seq__watch_time": self.watch[start:n].float(),
            "uih_seq__action_timestamp": self.time[start:n],
            "cand_seq__video_id": candidates,
            "cand_seq__query_time": torch.full((candidates.numel(),), int(query_time)),
            "user_id": torch.tensor([self.user_id]),
        }
        for name, value in zip(("user_active_degree", "follow_user_num_range",
                                "fans_user_num_range", "friend_user_num_range",
                                "register_days_range"), self.profile):
            row[name] = value.view(1)
        return {name: value for name, value in row.items() if name in self.serving.features}


def batch(*rows):
    """The serving input dict of several rows."""
    out = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
    out["uih_seq.lengths"] = torch.tensor([row["uih_seq__video_id"].numel() for row in rows])
    out["cand_seq.lengths"] = torch.tensor([row["cand_seq__video_id"].numel() for row in rows])
    return out


def full_scores(serving, inputs):
    with torch.no_grad():
        return serving(inputs)


def assert_equal_scores(got, expected, atol=ATOL):
    assert got.keys() == expected.keys()
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], atol=atol, rtol=0,
                                   msg=lambda m, task=task: f"task {task}: {m}")


def assert_same_caches(got, expected, keys, atol, rtol=0.0):
    """The two scorers' caches of `keys` hold the same rows (compared on the CPU)."""
    for key in keys:
        a, b = got.store.get(key), expected.store.get(key)
        assert a.length == b.length, f"user {key}"
        for index in range(len(b.keys)):
            for x, y in zip(a.layer(index), b.layer(index)):
                torch.testing.assert_close(x.cpu(), y.cpu(), atol=atol, rtol=rtol,
                                           msg=lambda m, key=key: f"user {key}: {m}")


def max_difference(got, expected):
    return max(float((got[t] - expected[t]).abs().max()) for t in expected)


@pytest.fixture(scope="module")
def smoke_serving():
    return build_serving()


def cached(serving, **policy):
    from hstu.export.cached import CachedServing, CachePolicy

    return CachedServing(serving, CachePolicy(**policy))


def test_first_request_then_reuse_equal_full_scores(smoke_serving):
    users = [User(smoke_serving, 11, 1), User(smoke_serving, 12, 2), User(smoke_serving, 13, 3)]
    requests = batch(users[0].request(40, [5, 6, 7, 8, 9]),
                     users[1].request(0, [1, 2]),  # no history
                     users[2].request(25, [3]))  # one candidate
    expected = full_scores(smoke_serving, requests)
    scorer = cached(smoke_serving)
    assert_equal_scores(scorer.score(requests, [11, 12, 13]), expected)
    assert scorer.counters.no_entry == 3 and scorer.counters.encoded == 3
    # The same requests again: scored from the cache.
    assert_equal_scores(scorer.score(requests, [11, 12, 13]), expected)
    assert scorer.counters.reused_exact == 3
    # Other candidates at the same query time: still exact from the cache.
    query = int(requests["cand_seq__query_time"][0])
    other = batch(users[0].request(40, [100, 200, 300], query))
    assert_equal_scores(scorer.score(other, [11]), full_scores(smoke_serving, other))
    assert scorer.counters.reused_exact == 4


def test_candidates_in_several_calls_equal_one_call(smoke_serving):
    user = User(smoke_serving, 21, 4)
    everything = batch(user.request(50, list(range(10, 40))))
    expected = full_scores(smoke_serving, everything)
    scorer = cached(smoke_serving)
    query = int(everything["cand_seq__query_time"][0])
    parts = []
    for chunk in (range(10, 20), range(20, 30), range(30, 40)):
        request = batch(user.request(50, list(chunk), query))
        parts.append(scorer.score(request, [21]))
    got = {task: torch.cat([part[task] for part in parts]) for task in expected}
    assert_equal_scores(got, expected)
    assert scorer.counters.encoded == 1 and scorer.counters.reused_exact == 2


def test_new_actions_in_exact_mode_re_encode_and_stay_exact(smoke_serving):
    user = User(smoke_serving, 31, 5)
    scorer = cached(smoke_serving, mode="exact")
    scorer.score(batch(user.request(40, [1, 2, 3])), [31])
    request = batch(user.request(50, [4, 5, 6]))
    assert_equal_scores(scorer.score(request, [31]), full_scores(smoke_serving, request))
    # contextual tokens + 2 layers + positions counted from the end: never exact to append
    assert scorer.counters.not_exact == 1 and scorer.counters.encoded == 2


def test_moved_query_time_reuses_only_when_every_bucket_stays(smoke_serving):
    from hstu.modules.kv_cache import reuse_is_exact

    user = User(smoke_serving, 41, 6)
    scorer = cached(smoke_serving, mode="exact")
    first = batch(user.request(30, [7, 8]))
    scorer.score(first, [41])
    query = int(first["cand_seq__query_time"][0])
    entry = scorer.store.get(41)
    # The newest action is 600 s old: bucket floor(sqrt(600 / 60)) = 3 until 960 s.
    assert reuse_is_exact(smoke_serving.encoder, entry, 0, query + 100)
    assert not reuse_is_exact(smoke_serving.encoder, entry, 0, query + 400)
    for moved in (query + 100, query + 400):
        request = batch(user.request(30, [7, 8], moved))
        assert_equal_scores(scorer.score(request, [41]), full_scores(smoke_serving, request))
    assert scorer.counters.reused_exact == 1 and scorer.counters.not_exact == 1


def test_changed_history_or_profile_re_encodes(smoke_serving):
    user = User(smoke_serving, 51, 7)
    scorer = cached(smoke_serving, mode="incremental")
    scorer.score(batch(user.request(30, [1, 2])), [51])
    # The history now starts later (a length cap dropped its oldest actions).
    request = batch(user.request(35, [1, 2], start=5))
    assert_equal_scores(scorer.score(request, [51]), full_scores(smoke_serving, request))
    assert scorer.counters.history_changed == 1
    # An edited action inside the cached history.
    user.action[10] = (user.action[10] + 1) % 256
    request = batch(user.request(35, [1, 2], start=5))
    assert_equal_scores(scorer.score(request, [51]), full_scores(smoke_serving, request))
    assert scorer.counters.history_changed == 2
    user.profile[0] = (user.profile[0] + 1) % 5
    request = batch(user.request(35, [1, 2], start=5))
    assert_equal_scores(scorer.score(request, [51]), full_scores(smoke_serving, request))
    assert scorer.counters.history_changed == 3
    # A float input (a watch time) moved by one ulp: compared bit for bit, so re-encoded.
    user.watch[20] = torch.nextafter(user.watch[20], torch.tensor(1e9))
    request = batch(user.request(35, [1, 2], start=5))
    assert_equal_scores(scorer.score(request, [51]), full_scores(smoke_serving, request))
    assert scorer.counters.history_changed == 4


def test_window_max_attn_len():
    serving = build_serving(["model_config.dlrm_hstu.hstu.stu.max_attn_len=7"], seed=1)
    users = [User(serving, 61, 8), User(serving, 62, 9)]
    requests = batch(users[0].request(45, [1, 2, 3]), users[1].request(4, [5]))
    expected = full_scores(serving, requests)
    scorer = cached(serving)
    assert_equal_scores(scorer.score(requests, [61, 62]), expected)
    assert_equal_scores(scorer.score(requests, [61, 62]), expected)
    assert scorer.counters.reused_exact == 2


def test_exact_append_without_contextual_tokens_or_time_encoding():
    # Positions count from the start without time encoding, and with no contextual token no
    # cached state depends on later tokens: appending is exact.
    serving = build_serving(
        ["model_config.dlrm_hstu.hstu.positional_encoder.use_time_encoding=false"],
        drop_contextual=True, seed=2)
    assert serving.encoder.preprocessor.contextual_seq_len == 0
    user = User(serving, 71, 10)
    scorer = cached(serving, mode="exact")
    for n in (20, 31, 31, 45):
        request = batch(user.request(n, [n, n + 1, n + 2]))
        assert_equal_scores(scorer.score(request, [71]), full_scores(serving, request))
    assert scorer.counters.encoded == 1
    assert scorer.counters.reused_exact == 3
    assert scorer.counters.appended_tokens == 11 + 0 + 14


def test_exact_append_with_contextual_tokens_and_one_layer():
    serving = build_serving(
        ["model_config.dlrm_hstu.hstu.positional_encoder.use_time_encoding=false",
         "model_config.dlrm_hstu.hstu.attn_num_layers=1"], seed=3)
    assert serving.encoder.preprocessor.contextual_seq_len > 0
    user = User(serving, 81, 11)
    scorer = cached(serving, mode="exact")
    for n in (10, 22, 40):
        request = batch(user.request(n, [3, 4]))
        assert_equal_scores(scorer.score(request, [81]), full_scores(serving, request))
    assert scorer.counters.encoded == 1 and scorer.counters.appended_tokens == 30


def test_history_check_ends_sees_cuts_and_appends_but_not_inner_edits(smoke_serving):
    """CachePolicy.history_check="ends" compares the first and last cached action of every
    input: a stream of appends scores as with "full", a history cut at its front or a changed
    last action is re-encoded, and an edit strictly inside the cached actions is NOT seen
    (the documented price); "full" re-encodes that one."""
    scores = {}
    for check in ("full", "ends"):
        user = User(smoke_serving, 52, 8)
        scorer = cached(smoke_serving, mode="exact", history_check=check)
        scorer.score(batch(user.request(30, [1, 2])), [52])
        request = batch(user.request(30, [3, 4]))  # the same history: reused
        assert_equal_scores(scorer.score(request, [52]), full_scores(smoke_serving, request))
        assert scorer.counters.reused_exact == 1
        request = batch(user.request(35, [1, 2], start=5))  # cut at the front
        assert_equal_scores(scorer.score(request, [52]), full_scores(smoke_serving, request))
        assert scorer.counters.history_changed == 1
        user.time[34] += 1  # the last cached action's timestamp
        request = batch(user.request(35, [1, 2], start=5))
        assert_equal_scores(scorer.score(request, [52]), full_scores(smoke_serving, request))
        assert scorer.counters.history_changed == 2
        user.action[20] = (user.action[20] + 1) % 256  # inside the cached actions
        request = batch(user.request(35, [1, 2], start=5))
        scores[check] = scorer.score(request, [52])
        expected = full_scores(smoke_serving, request)
        if check == "full":
            assert scorer.counters.history_changed == 3
            assert_equal_scores(scores[check], expected)
        else:
            assert scorer.counters.history_changed == 2 and scorer.counters.reused_exact == 2
            assert max_difference(scores[check], expected) > 1e-4  # scored on the old action
    with pytest.raises(ValueError, match="history_check"):
        cached(smoke_serving, history_check="some")


def test_history_check_ends_reuses_appends_like_full(smoke_serving):
    """Appended actions (incremental mode, so the cache is reused): the "ends" check finds
    the same reuses as "full" and gives the same scores; its comparison is with the cached
    last action, not the request's last (here the request is 5 actions longer)."""
    scores, counters = {}, {}
    for check in ("full", "ends"):
        user = User(smoke_serving, 53, 9)
        scorer = cached(smoke_serving, mode="incremental", history_check=check,
                        max_stale_seconds=86_400)
        scorer.score(batch(user.request(30, [1, 2])), [53])
        scores[check] = [scorer.score(batch(user.request(n, [1, 2])), [53]) for n in (35, 40)]
        counters[check] = scorer.counters.as_dict()
    assert counters["ends"] == counters["full"]
    assert counters["ends"]["reused_stale"] == 2 and counters["ends"]["appended_tokens"] == 10
    for got, want in zip(scores["ends"], scores["full"]):
        assert_equal_scores(got, want, atol=0)
    # An empty cached history (a user whose first request had no actions) is extended too.
    user = User(smoke_serving, 54, 10)
    scorer = cached(smoke_serving, mode="incremental", history_check="ends",
                    max_stale_seconds=1 << 40)
    scorer.score(batch(user.request(0, [1, 2])), [54])
    scorer.score(batch(user.request(4, [1, 2])), [54])
    assert scorer.counters.reused_stale == 1


def test_incremental_mode_appends_and_its_difference_is_measured(smoke_serving):
    """Appending to a stale cache is approximate; this pins the size of the difference on the
    smoke model (random weights, position and time tables scaled up 30x) and that the bound
    on stale tokens sends the user back to an exact re-encode."""
    user = User(smoke_serving, 91, 12)
    scorer = cached(smoke_serving, mode="incremental", max_stale_tokens=12,
                    max_stale_seconds=86_400)
    scorer.score(batch(user.request(40, [1, 2, 3])), [91])
    differences = []
    for n in (44, 48, 52):
        request = batch(user.request(n, [1, 2, 3]))
        differences.append(max_difference(scorer.score(request, [91]),
                                          full_scores(smoke_serving, request)))
    assert scorer.counters.reused_stale == 3 and scorer.counters.appended_tokens == 12
    assert not scorer.store.get(91).exact
    # approximate: different from the full pass, but not wildly (probabilities in [0, 1])
    assert max(differences) > 1e-4
    assert max(differences) < 0.2
    request = batch(user.request(53, [1, 2, 3]))  # 13 stale tokens > 12: re-encode
    assert_equal_scores(scorer.score(request, [91]), full_scores(smoke_serving, request))
    assert scorer.counters.too_stale == 1 and scorer.store.get(91).exact


def test_appends_of_several_users_in_one_call_equal_one_user_per_call(smoke_serving):
    """The store update copies every user's new keys and values in one multi-tensor copy:
    three users appended in one call must give the scores and the cache contents of the same
    appends made one user per call (first encodes in one call too, so that the new entries'
    buffers come from the batched copy as well)."""
    users = [User(smoke_serving, 111 + i, 20 + i) for i in range(3)]
    keys = [111, 112, 113]
    policy = dict(mode="incremental", max_stale_tokens=50, max_stale_seconds=86_400)
    together, alone = cached(smoke_serving, **policy), cached(smoke_serving, **policy)
    together.score(batch(*[u.request(30 + 3 * i, [1, 2]) for i, u in enumerate(users)]), keys)
    for i, (user, key) in enumerate(zip(users, keys)):
        alone.score(batch(user.request(30 + 3 * i, [1, 2])), [key])
    for step in (4, 9):
        requests = [u.request(30 + 3 * i + step, [3, 1, 2]) for i, u in enumerate(users)]
        got = together.score(batch(*requests), keys)
        one_by_one = [alone.score(batch(request), [key]) for request, key in zip(requests, keys)]
        for task in got:
            torch.testing.assert_close(got[task], torch.cat([s[task] for s in one_by_one]),
                                       atol=1e-6, rtol=0)
    assert together.counters.reused_stale == 6 and together.counters.appended_tokens == 27
    assert_same_caches(together, alone, keys, atol=1e-6)


def test_rows_of_one_user_in_one_call_are_scored_in_order(smoke_serving):
    user, other = User(smoke_serving, 101, 13), User(smoke_serving, 102, 14)
    requests = [user.request(20, [1]), other.request(5, [2]), user.request(20, [3, 4])]
    scorer = cached(smoke_serving)
    got = scorer.score(batch(*requests), [101, 102, 101])
    expected = full_scores(smoke_serving, batch(*requests))
    assert_equal_scores(got, expected)
    assert scorer.counters.encoded == 2 and scorer.counters.reused_exact == 1


def test_newest_first_rows():
    serving = build_serving(["model_config.dlrm_hstu.sequence_timestamp_is_ascending=false"],
                            seed=4)
    user = User(serving, 111, 15)

    def newest_first(request):
        return {name: (value.flip(0) if name.startswith(("uih_seq__", "cand_seq__")) else value)
                for name, value in request.items()}

    scorer = cached(serving)
    first = batch(newest_first(user.request(30, [1, 2, 3])))
    assert_equal_scores(scorer.score(first, [111]), full_scores(serving, first))
    assert_equal_scores(scorer.score(first, [111]), full_scores(serving, first))
    assert scorer.counters.reused_exact == 1
    # Several users, two rows each in one call: two waves, whose scores go back to their
    # rows' places (newest-first rows are reversed on the way in and out).
    other = User(serving, 112, 16)
    rows = [user.request(30, [1, 2, 3]), other.request(10, [4]), user.request(30, [5, 6]),
            other.request(12, [7, 8])]
    inputs = batch(*[newest_first(row) for row in rows])
    for _ in range(2):
        assert_equal_scores(scorer.score(inputs, [111, 112, 111, 112]),
                            full_scores(serving, inputs))


def test_store_is_bounded_least_recently_used_first(smoke_serving):
    users = [User(smoke_serving, 200 + i, 20 + i) for i in range(4)]
    scorer = cached(smoke_serving)
    scorer.score(batch(users[0].request(30, [1])), [200])
    one_entry = scorer.store.stats.bytes
    from hstu.export.cached import CachedServing, CachePolicy

    scorer = CachedServing(smoke_serving, CachePolicy(max_bytes=int(one_entry * 2.5)))
    for user in users[:3]:
        scorer.score(batch(user.request(30, [1])), [user.user_id])
    assert 200 not in scorer.store and {201, 202} <= set(scorer.store._entries)
    assert scorer.store.stats.evictions == 1 and scorer.store.stats.bytes <= scorer.store.max_bytes
    scorer.score(batch(users[1].request(30, [1])), [201])  # 201 becomes the most recent
    scorer.score(batch(users[3].request(30, [1])), [203])
    assert 202 not in scorer.store and 201 in scorer.store
    tiny = CachedServing(smoke_serving, CachePolicy(max_bytes=100))
    request = batch(users[0].request(30, [1]))
    assert_equal_scores(tiny.score(request, [200]), full_scores(smoke_serving, request))
    assert tiny.store.stats.rejected == 1 and len(tiny.store) == 0


def test_triton_cached_kernel_in_the_model(smoke_serving):
    from hstu.ops import Kernel

    serving = build_serving(seed=5)
    user = User(serving, 301, 30, length=24)
    first = batch(user.request(20, [1, 2]))
    expected = full_scores(serving, first)
    for layer in serving.encoder.stu_stack.layers:
        layer.kernel = Kernel.TRITON  # every STU op, the cached attention included
    scorer = cached(serving)
    assert_equal_scores(scorer.score(first, [301]), expected, atol=2e-5)
    assert_equal_scores(scorer.score(first, [301]), expected, atol=2e-5)
    assert scorer.counters.reused_exact == 1


def test_triton_cached_kernel_reads_each_users_cache_in_place():
    """Several users in one call under TRITON: the attention reads each user's cached keys
    and values where they lie (CacheRows), a user met for the first time being a row without
    a cache. Exact scores, and the same scores as the PYTORCH kernel's concatenated caches."""
    from hstu.ops import Kernel

    serving = build_serving(seed=6)
    users = [User(serving, 311 + i, 40 + i, length=24) for i in range(3)]
    keys = [311, 312, 313]
    first = batch(users[0].request(20, [1, 2]), users[1].request(12, [3]))
    again = batch(users[0].request(20, [4, 5, 6]), users[2].request(9, [7, 1]),
                  users[1].request(12, [2, 3]))
    expected = full_scores(serving, again)
    for layer in serving.encoder.stu_stack.layers:
        layer.kernel = Kernel.TRITON
    scorer = cached(serving)
    scorer.score(first, keys[:2])

    def no_concatenation(self):
        raise AssertionError("the TRITON path concatenated the caches")

    with pytest.MonkeyPatch.context() as patch:
        from hstu.ops.cached_attention import CacheRows

        patch.setattr(CacheRows, "cat", no_concatenation)
        got = scorer.score(again, [keys[0], keys[2], keys[1]])
    assert scorer.counters.reused_exact == 2 and scorer.counters.no_entry == 3
    assert_equal_scores(got, expected, atol=2e-5)


def test_a_failed_store_update_forgets_the_wave(smoke_serving, monkeypatch):
    """If writing the new keys and values fails, the wave's entries may claim rows never
    written: those users are dropped from the store (re-encoded next time), not served."""
    from hstu.export import cached as cached_module

    users = [User(smoke_serving, 331 + i, 70 + i) for i in range(2)]
    scorer = cached(smoke_serving, mode="incremental", max_stale_tokens=50,
                    max_stale_seconds=86_400)
    scorer.score(batch(users[0].request(20, [1]), users[1].request(22, [2])), [331, 332])

    def failing_write(*args, **kwargs):
        raise RuntimeError("write failed")

    monkeypatch.setattr(cached_module, "write_rows", failing_write)
    request = batch(users[0].request(24, [1]), users[1].request(25, [2]))
    with pytest.raises(RuntimeError, match="write failed"):
        scorer.score(request, [331, 332])
    assert 331 not in scorer.store and 332 not in scorer.store
    monkeypatch.undo()
    assert_equal_scores(scorer.score(request, [331, 332]), full_scores(smoke_serving, request))
    assert scorer.counters.no_entry == 4


def test_errors(smoke_serving):
    from hstu.export.cached import CachePolicy

    with pytest.raises(ValueError, match="cache mode"):
        CachePolicy(mode="lazy")
    user = User(smoke_serving, 401, 40)
    scorer = cached(smoke_serving)
    with pytest.raises(ValueError, match="no candidates"):
        scorer.score(batch(user.request(10, [])), [401])
    with pytest.raises(ValueError, match="2 keys for 1 rows"):
        scorer.score(batch(user.request(10, [1])), [401, 402])


def test_export_directory_rebuilds_the_program(smoke_export, samples):
    from hstu.export.artifacts import open_export_dir
    from hstu.export.cached import CachedServing, load_serving_module
    from hstu.export.serving import synthetic_inputs, with_filler_row, without_filler_scores

    serving = load_serving_module(smoke_export.export_dir)
    _, program = open_export_dir(smoke_export.export_dir)
    features = list(serving.features.values())
    timestamps = set(serving.groups["uih_timestamp"] + serving.groups["candidate_timestamp"])
    from hstu.export.serving import serving_inputs

    inputs = synthetic_inputs(features, timestamps, serving.uih_sequence,
                              {"uih_seq": [7, 0, 12], "cand_seq": [3, 2, 1]}, seed=3)
    with torch.no_grad():
        padded = with_filler_row(inputs, serving_inputs(features))
        expected = without_filler_scores(program.module()(padded))
    scorer = CachedServing(serving)
    assert_equal_scores(scorer.score(inputs, [1, 2, 3]), expected, atol=1e-5)


@pytest.mark.gpu
def test_several_users_on_the_gpu_equal_the_cpu():
    """The GPU path (TRITON cached attention reading each user's buffers in place, new rows
    written through the buffers' addresses, host tensors packed into one copy) against the CPU
    path (PYTORCH, concatenated caches, sliced copies): same scores and same cache contents
    over encodes, appends and a new user beside cached ones."""
    import copy

    from hstu.ops import Kernel

    on_cpu = build_serving(seed=8)
    on_gpu = copy.deepcopy(on_cpu).to("cuda")
    for layer in on_gpu.encoder.stu_stack.layers:
        layer.kernel = Kernel.TRITON
    users = [User(on_cpu, 321 + i, 60 + i) for i in range(3)]
    keys = [321, 322, 323]
    policy = dict(mode="incremental", max_stale_tokens=50, max_stale_seconds=86_400)
    scorers = {device: cached(serving, **policy)
               for device, serving in (("cpu", on_cpu), ("cuda", on_gpu))}
    calls = [
        (batch(users[0].request(30, [1, 2]), users[1].request(25, [3])), keys[:2]),
        (batch(users[0].request(34, [4, 5]), users[2].request(12, [6]),
               users[1].request(31, [7, 8, 9])), [keys[0], keys[2], keys[1]]),
        (batch(users[1].request(33, [1]), users[0].request(40, [2, 3])), [keys[1], keys[0]]),
    ]
    for inputs, call_keys in calls:
        got = scorers["cuda"].score(inputs, call_keys)
        want = scorers["cpu"].score(inputs, call_keys)
        for task in want:
            torch.testing.assert_close(got[task].cpu(), want[task], atol=1e-4, rtol=0)
    assert_same_caches(scorers["cuda"], scorers["cpu"], keys, atol=1e-4, rtol=1e-4)


def _recording_replays():
    """GraphReplays that run eagerly (padded waves, on the CPU) and keep each wave's key."""
    from hstu.export.cached_graphs import GraphReplays

    class Recording(GraphReplays):
        def run(self, key, fn, inputs, device):
            self.keys.append(key)
            return super().run(key, fn, inputs, device)

    recording = Recording(capture=False)
    recording.keys = []
    return recording


def _graph_stream(serving):
    """Calls that cover a wave's cases: new users only, appends beside a new user, candidates
    against unchanged caches, two rows of one user (two waves)."""
    users = [User(serving, 501 + i, 70 + i) for i in range(4)]
    keys = [501, 502, 503, 504]
    return keys, [
        (batch(users[0].request(30, [1, 2]), users[1].request(25, [3])), keys[:2]),
        (batch(users[0].request(34, [4, 5]), users[2].request(12, [6]),
               users[1].request(31, [7, 8, 9])), [keys[0], keys[2], keys[1]]),
        (batch(users[1].request(31, [1]), users[0].request(34, [2, 3])), [keys[1], keys[0]]),
        (batch(users[3].request(0, [5]), users[2].request(15, [1, 2]),
               users[2].request(18, [3])), [keys[3], keys[2], keys[2]]),
    ]


@pytest.mark.parametrize("mode", ["exact", "incremental"])
def test_waves_padded_for_graphs_score_like_unpadded_ones(smoke_serving, mode):
    """What a CUDA graph replays is the padded wave (hstu/export/cached_graphs.py): run eagerly
    on the CPU, it must give the unpadded wave's scores and leave the same caches."""
    from hstu.export.cached import CachedServing, CachePolicy

    policy = CachePolicy(mode=mode, max_stale_tokens=50, max_stale_seconds=86_400)
    recording = _recording_replays()
    padded = CachedServing(smoke_serving, policy, graphs=recording)
    plain = CachedServing(smoke_serving, policy, graphs=None)
    keys, calls = _graph_stream(smoke_serving)
    for inputs, call_keys in calls:
        assert_equal_scores(padded.score(inputs, call_keys), plain.score(inputs, call_keys),
                            atol=1e-6)
    assert padded.counters == plain.counters
    assert len(recording.keys) == 5  # the last call has two waves
    assert all(key[0].rows >= 8 + 1 for key in recording.keys)
    assert_same_caches(padded, plain, keys, atol=1e-6)


def _other_users_stream(serving):
    """Calls in which one bucket serves other users than the call that captured its graph:
    calls 2 and 3 append to users 1-2, then to users 3-4 (other cache lengths, other
    buffers, grown by the appends); call 4 mixes them; call 5 repeats."""
    users = [User(serving, 601 + i, 80 + i) for i in range(4)]
    keys = [601, 602, 603, 604]
    lengths = [30, 25, 12, 40]

    def call(rows, added, candidates):
        for row in rows:
            lengths[row] += added
        inputs = batch(*[users[row].request(lengths[row], candidates) for row in rows])
        return inputs, [keys[row] for row in rows]

    return keys, [call((0, 1), 0, [1, 2]), call((2, 3), 0, [1, 2]),  # new users: whole rows
                  call((0, 1), 3, [3, 4]), call((2, 3), 3, [5, 6]),  # appends: same bucket
                  call((0, 2), 3, [7, 8]), call((1, 3), 0, [2, 1])]


@pytest.mark.parametrize("mode", ["exact", "incremental"])
def test_the_gpu_graph_test_replays_a_bucket_for_other_users(mode):
    """The premise of the GPU test below, checked on the CPU: calls 2 and 3 of its stream
    (other users) pad to the same graph key."""
    from hstu.export.cached import CachedServing, CachePolicy

    recording = _recording_replays()
    scorer = CachedServing(build_serving(seed=9), CachePolicy(
        mode=mode, max_stale_tokens=50, max_stale_seconds=86_400), graphs=recording)
    _, calls = _other_users_stream(scorer.serving)
    for inputs, call_keys in calls:
        scorer.score(inputs, call_keys)
    assert len(recording.keys) == 6 and recording.keys[2] == recording.keys[3]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "incremental"])
def test_cuda_graphs_score_like_eager_calls_on_the_gpu(mode):
    """CachedServing on a GPU with TRITON kernels replays each wave from a CUDA graph of its
    bucket: the scores and caches must equal the eager GPU path's over the same stream. The
    stream makes one graph serve calls of OTHER users than the capture's (other cache
    lengths, other buffers, one grown in between): whatever a graph had baked in of the
    capturing call would show."""
    from hstu.export.cached import CachedServing, CachePolicy
    from hstu.export.cached_graphs import GraphReplays
    from hstu.ops import Kernel

    serving = build_serving(seed=9).to("cuda")
    for module in serving.modules():
        if getattr(module, "kernel", None) is not None:
            module.kernel = Kernel.TRITON
    policy = CachePolicy(mode=mode, max_stale_tokens=50, max_stale_seconds=86_400)
    graphs = GraphReplays(capture_after=1)
    graphed = CachedServing(serving, policy, graphs=graphs)
    eager = CachedServing(serving, policy, graphs=None)
    keys, calls = _other_users_stream(serving)
    counts = []
    for index, (inputs, call_keys) in enumerate(calls):
        got = graphed.score(inputs, call_keys)
        want = eager.score(inputs, call_keys)
        counts.append((graphs.stats["captures"], graphs.stats["replays"]))
        for task in want:
            torch.testing.assert_close(got[task], want[task], atol=1e-5, rtol=0,
                                       msg=lambda m, i=index: f"call {i}: {m}")
    assert graphed.counters == eager.counters
    # Call 3 (users 3 and 4) replayed a graph captured for other users (calls 1 or 2; the
    # buckets are checked on the CPU to coincide).
    assert counts[3][0] == counts[2][0] and counts[3][1] == counts[2][1] + 1
    assert_same_caches(graphed, eager, keys, atol=1e-5)


def test_waves_above_graph_max_tokens_run_eagerly(smoke_serving):
    from hstu.export.cached import CachedServing, CachePolicy

    recording = _recording_replays()
    scorer = CachedServing(smoke_serving, CachePolicy(mode="incremental", graph_max_tokens=40),
                           graphs=recording)
    keys, calls = _graph_stream(smoke_serving)
    for inputs, call_keys in calls[:3]:
        scorer.score(inputs, call_keys)
    # The first two calls encode new users (55 and 12 history tokens, with their contextual
    # tokens and the appends): over 40 tokens, eager. The third appends 6 tokens and scores 3
    # candidates: padded for a graph.
    assert len(recording.keys) == 1


def test_plan_needs_timestamps_only_when_a_row_has_a_cache(smoke_serving):
    from hstu.modules.kv_cache import plan_cached_encode

    user = User(smoke_serving, 801, 5)
    scorer = cached(smoke_serving, mode="incremental")
    scorer.score(batch(user.request(20, [1])), [801])
    encoder = smoke_serving.encoder
    plan = plan_cached_encode(encoder, [None], history_lengths=[20], candidate_counts=[1],
                              timestamps=None)
    assert plan.whole_rows and plan.max_cache_len == 0
    with pytest.raises(ValueError, match="timestamps are needed"):
        plan_cached_encode(encoder, [scorer.store.get(801)], history_lengths=[3],
                           candidate_counts=[1], timestamps=None)


def test_plan_says_aligned_only_when_every_cache_buffer_is(smoke_serving):
    """The TRITON attention reads paged rows in 16-byte vectors only when the plan found every
    buffer address (and row size) a multiple of 16 bytes: entries made by serving are; one
    whose buffers start off a boundary (made by a caller) is read element by element."""
    from hstu.modules.kv_cache import CacheEntry, plan_cached_encode

    user = User(smoke_serving, 802, 5)
    scorer = cached(smoke_serving, mode="incremental")
    scorer.score(batch(user.request(20, [1])), [802])
    entry = scorer.store.get(802)
    times = torch.arange(3 + 1, dtype=torch.int64) + 1_700_000_000

    def plan_of(cache_entry):
        return plan_cached_encode(smoke_serving.encoder, [cache_entry], history_lengths=[3],
                                  candidate_counts=[1], timestamps=times)

    assert plan_of(entry).aligned
    shifted = []
    for index in range(len(entry.keys)):
        pair = []
        for tensor in (entry.keys[index], entry.values[index]):
            rows = tensor[:entry.length]
            storage = torch.empty(rows.numel() + 1, dtype=rows.dtype)
            view = storage[1:].view(rows.shape)  # contiguous, one element off the allocation
            view.copy_(rows)
            pair.append(view)
        shifted.append(tuple(pair))
    moved = CacheEntry(shifted, contextual_seq_len=entry.contextual_seq_len,
                       history_timestamps=entry.history_timestamps, anchor=entry.anchor,
                       contextual=None)
    assert moved.keys[0].data_ptr() % 16 != 0
    assert not plan_of(moved).aligned
