"""KuaiRand conversion: windows checked by hand on a tiny log, bad raw rows, the shared subset."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hstu.data import schema
from hstu.data.kuairand import (
    KuaiRandOptions,
    PartitionResult,
    _split_time_for_fraction,
    convert_kuairand,
    parse_column_map,
)
from hstu.data.validate import DataError, validate_table

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
SUBSET_LOG = SHARED / "kuairand27k_like_hate_kcore15" / "processed_standard_kcore_15.csv"
PURE_USERS = SHARED / "kuairand_pure_features" / "user_features_pure.csv"
PURE_VIDEOS = SHARED / "kuairand_pure_features" / "video_features_basic_pure.csv"

HEADER = (
    "user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,"
    "is_forward,is_hate,long_view,play_time_ms,duration_ms,is_profile_enter"
)


def log_line(user, video, time_ms, bits, play_ms) -> str:
    """A raw log line whose event columns spell out the bitmask `bits`."""
    flags = {name: int(bool(bits & bit)) for name, bit in schema.ACTION_BITS.items()}
    return (
        f"{user},{video},20220410,1700,{time_ms},{flags['is_click']},{flags['is_like']},"
        f"{flags['is_follow']},{flags['is_comment']},{flags['is_forward']},"
        f"{flags['is_hate']},{flags['long_view']},{play_ms},9999,{flags['is_profile_enter']}"
    )


# User 3's interactions in time order: (video, time_ms, bitmask, play_time_ms).
USER3 = [
    (101, 1_000_000_500, 65, 1000),  # click + long_view
    (102, 1_000_001_999, 2, 2000),  # like; 1_000_001.999 s floors to 1_000_001
    (103, 1_000_002_000, 12, 3000),  # follow + comment
    (104, 1_000_010_000, 16, 4000),  # forward
    (105, 1_000_020_000, 32, 5000),  # hate
    (106, 1_000_030_000, 128, 6000),  # profile_enter (eval: at the split time)
    (107, 1_000_040_000, 255, 7000),  # everything (eval)
]
SPLIT_TIME = 1_000_030  # seconds


def write_inputs(directory: Path) -> tuple[Path, Path, Path]:
    lines = [log_line(3, *row) for row in USER3]
    lines += [log_line(7, 201, 1_000_000_000, 1, 10), log_line(7, 202, 1_000_040_000, 0, 20)]
    lines += [log_line(5, 301, 1_000_005_000, 64, 30)]  # user 5 has no profile
    order = [6, 2, 8, 0, 9, 4, 1, 7, 3, 5]  # not time-sorted, users interleaved
    log = directory / "log.csv"
    log.write_text(HEADER + "\n" + "\n".join(lines[i] for i in order) + "\n")
    users = directory / "users.csv"
    users.write_text(
        "user_id,user_active_degree,follow_user_num_range,fans_user_num_range,"
        "friend_user_num_range,register_days_range,onehot_feat0\n"
        '7,high_active,0,"[1,10)",0,730+,1\n'
        '3,full_active,"(0,10]",0,"[1,5)",31-60,0\n'
    )
    videos = directory / "videos.csv"
    videos.write_text(
        "video_id,author_id,video_type,upload_type,tag\n"
        '101,900,NORMAL,A,"5,6"\n102,900,NORMAL,B,6\n103,901,NORMAL,A,5\n'
        "104,900,NORMAL,A,7\n105,901,AD,B,\n"
    )
    return log, users, videos


def small_options(directory: Path, log: Path, users: Path, **options) -> dict:
    """KuaiRandOptions fields for the tiny log of write_inputs, writing to directory/out."""
    return {
        "logs": (str(log),),
        "user_features": str(users),
        "out": str(directory / "out"),
        "max_candidates": 3,
        "max_seq_len": 6,
        "contextual": 1,
        "split_time": SPLIT_TIME,
        "video_id_buckets": 0,
        **options,
    }


def convert(directory: Path, **options) -> dict:
    log, users, videos = write_inputs(directory)
    defaults = small_options(directory, log, users, **options)
    if defaults.pop("mtgr", False):
        defaults["video_features"] = str(videos)
    return convert_kuairand(KuaiRandOptions(**defaults))


def rows(out: Path, split: str) -> list[dict]:
    return pq.read_table(out / split).to_pylist()


def test_windows_by_hand(tmp_path):
    manifest = convert(tmp_path)
    out = tmp_path / "out"
    train, evaluation = rows(out, "train"), rows(out, "eval")
    sid = lambda user, window: user * 2**20 + window
    assert [r["sample_id"] for r in train] == [sid(3, 0), sid(3, 1), sid(5, 0), sid(7, 0)]
    assert [r["sample_id"] for r in evaluation] == [sid(3, 2), sid(7, 1)]

    # User 3: training period = interactions 1-5 -> windows [1,2,3] and [4,5]; UIH capped to
    # max_seq_len 6 - contextual 1 - candidates 3 = 2 most recent earlier interactions.
    first, second = train[0], train[1]
    assert first["uih_seq__video_id"] == []
    assert first["cand_seq__video_id"] == [101, 102, 103]
    assert first["cand_seq__action_weight"] == [65, 2, 12]
    # Query time: the window's first interaction time, shared by its candidates.
    assert first["cand_seq__query_time"] == [1_000_000, 1_000_000, 1_000_000]
    assert first["cand_seq__watch_time"] == [1000.0, 2000.0, 3000.0]
    assert second["uih_seq__video_id"] == [102, 103]
    assert second["uih_seq__action_weight"] == [2, 12]
    assert second["uih_seq__action_timestamp"] == [1_000_001, 1_000_002]
    assert second["uih_seq__watch_time"] == [2000.0, 3000.0]
    assert second["cand_seq__video_id"] == [104, 105]
    assert second["cand_seq__action_weight"] == [16, 32]
    assert second["cand_seq__query_time"] == [1_000_010, 1_000_010]
    # Eval window: interactions at/after the split; its history is the training period's.
    last = evaluation[0]
    assert last["uih_seq__video_id"] == [104, 105]
    assert last["cand_seq__video_id"] == [106, 107]
    assert last["cand_seq__action_weight"] == [128, 255]
    assert last["cand_seq__query_time"] == [1_000_030, 1_000_030]

    # Profiles: dense 1-based codes in order of first appearance in the features file;
    # user 5 is not in it and gets 0 everywhere.
    assert [first[c] for c in schema.PROFILE_COLUMNS] == [2, 2, 2, 2, 2]
    assert [train[3][c] for c in schema.PROFILE_COLUMNS] == [1, 1, 1, 1, 1]
    assert [train[2][c] for c in schema.PROFILE_COLUMNS] == [0, 0, 0, 0, 0]
    codes = json.loads((out / "profile_codes.json").read_text())
    assert codes["user_active_degree"] == {"high_active": 1, "full_active": 2}
    assert codes["fans_user_num_range"] == {"[1,10)": 1, "0": 2}

    assert evaluation[1]["uih_seq__video_id"] == [201]
    assert evaluation[1]["cand_seq__video_id"] == [202]
    assert manifest["split_time"] == SPLIT_TIME
    assert manifest["input"] == {
        "files": [str(tmp_path / "log.csv")],
        "rows": 10,
        "as_candidate": 10,
        "history_only": 0,
        "skipped": 0,
    }
    assert manifest["users"] == {"total": 3, "without_profile": 1}
    assert manifest["splits"]["train"]["rows"] == 4
    assert manifest["splits"]["train"]["candidate_tokens"] == 3 + 2 + 1 + 1
    assert manifest["splits"]["train"]["uih_tokens"] == 0 + 2 + 0 + 0
    assert manifest["splits"]["eval"]["tokens"] == (2 + 2) + (1 + 1)
    histogram = manifest["splits"]["train"]["length_histogram"]
    assert histogram["uih"][:3] == [3, 0, 1]  # lengths 0, 0, 0 and 2
    assert manifest["options"]["max_history"] == 2


def test_candidate_query_time_own(tmp_path):
    """candidate_query_time="own": each candidate keeps its own interaction time."""
    convert(tmp_path, candidate_query_time="own")
    out = tmp_path / "out"
    first, second = rows(out, "train")[:2]
    assert first["cand_seq__query_time"] == [1_000_000, 1_000_001, 1_000_002]
    assert second["cand_seq__query_time"] == [1_000_010, 1_000_020]
    assert rows(out, "eval")[0]["cand_seq__query_time"] == [1_000_030, 1_000_040]


def test_min_history_and_accounting(tmp_path):
    manifest = convert(tmp_path, min_history=1)
    # The first interaction of every user is history only; user 5 then has no window.
    assert manifest["input"]["history_only"] == 3
    assert manifest["input"]["as_candidate"] == 7
    train = rows(tmp_path / "out", "train")
    assert train[0]["uih_seq__video_id"] == [101]
    assert train[0]["cand_seq__video_id"] == [102, 103, 104]
    assert 5 not in {r["user_id"] for r in train}


def test_mtgr_side_info_and_cross_features(tmp_path):
    convert(tmp_path, mtgr=True, video_id_buckets=100)
    out = tmp_path / "out"
    train, evaluation = rows(out, "train"), rows(out, "eval")
    first, second, last = train[0], train[1], evaluation[0]
    # cate1 = upload_type code (A=1, B=2), cate2 = first tag code (5=1, 6=2, 7=3); unknown 0.
    assert first["cand_seq__video_cate1"] == [1, 2, 1]
    assert first["cand_seq__video_cate2"] == [1, 2, 1]
    assert second["uih_seq__video_cate1"] == [2, 1]
    assert second["cand_seq__video_cate2"] == [3, 0]  # video 105 has no tag
    assert last["cand_seq__video_cate1"] == [0, 0]  # videos 106, 107 unknown
    # cross = code of the count of earlier interactions with the same author / tag:
    # 0 -> 1, 1 -> 2, 2-3 -> 3, 4-7 -> 4, ...
    assert first["cand_seq__user_video_cross1"] == [1, 1, 1]  # nothing earlier
    # Video 104 (author 900): 101 and 102 earlier -> 2 -> code 3. Video 105 (author 901): 103.
    assert second["cand_seq__user_video_cross1"] == [3, 2]
    assert second["cand_seq__user_video_cross2"] == [1, 0]  # tag 7 unseen; 105 has no tag
    assert last["cand_seq__user_video_cross1"] == [0, 0]
    # Video ids modulo 100; side info was joined on the raw ids.
    assert first["cand_seq__video_id"] == [1, 2, 3]
    assert json.loads((out / "video_codes.json").read_text())["video_cate1"] == {"A": 1, "B": 2}


def test_split_by_eval_fraction():
    result = PartitionResult("x")
    result.minutes = np.array([10, 11, 12, 13])
    result.minute_counts = np.array([50, 30, 15, 5])
    # The latest 20% (20 of 100) are in minutes 12 and 13.
    assert _split_time_for_fraction([result], 0.2) == 12 * 60
    assert _split_time_for_fraction([result], 0.05) == 13 * 60
    assert _split_time_for_fraction([result], 0.0) == 14 * 60


def test_column_map_parsing():
    mapping = parse_column_map(["is_like=label", "is_hate=1-label", "is_follow=0"])
    assert mapping["is_like"].source == "label" and not mapping["is_like"].complement
    assert mapping["is_hate"].source == "label" and mapping["is_hate"].complement
    assert mapping["is_follow"].constant == 0
    with pytest.raises(ValueError, match="not a log column"):
        parse_column_map(["likes=label"])
    with pytest.raises(ValueError, match="TARGET=EXPR"):
        parse_column_map(["is_like"])


# (case, line replacing data line 3 of the log (file line 4), column named, problem)
BAD_LINES = [
    ("not a number", log_line(3, "abc", 1_000_002_000, 12, 3000), "video_id", "not a whole number"),
    ("empty value", log_line(3, 103, "", 12, 3000), "time_ms", "missing"),
    # The last field is is_profile_enter.
    (
        "flag not 0/1",
        log_line(3, 103, 1_000_002_000, 12, 3000)[:-1] + "7",
        "is_profile_enter",
        "not 0 or 1",
    ),
    ("negative time", log_line(3, 103, -5, 12, 3000), "time_ms", "negative time_ms"),
    (
        "negative play time",
        log_line(3, 103, 1_000_002_000, 12, -1),
        "play_time_ms",
        "negative play_time_ms",
    ),
]


@pytest.mark.parametrize(
    "line, column, problem", [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES]
)
def test_bad_log_line(tmp_path, line, column, problem):
    log, users, _ = write_inputs(tmp_path)
    lines = log.read_text().splitlines()
    lines[3] = line
    log.write_text("\n".join(lines) + "\n")
    options = small_options(tmp_path, log, users)
    with pytest.raises(DataError) as error:
        convert_kuairand(KuaiRandOptions(**options))
    assert error.value.path == str(log) and error.value.line == 4 and error.value.row is None
    assert f"file {log}, line 4, column {column!r}" in str(error.value)
    assert error.value.column == column and problem in error.value.problem

    manifest = convert_kuairand(KuaiRandOptions(**options, on_bad_rows="skip", overwrite=True))
    assert manifest["input"]["skipped"] == 1 and manifest["bad_rows"]["rows"] == 1
    ((reason, count),) = manifest["bad_rows"]["by_reason"].items()
    assert reason.startswith(column) and count == 1
    assert manifest["input"]["as_candidate"] == 9


def test_malformed_line_and_missing_column(tmp_path):
    log, users, _ = write_inputs(tmp_path)
    lines = log.read_text().splitlines()
    lines[2] = "3,104,20220410"
    log.write_text("\n".join(lines) + "\n")
    options = {
        "logs": (str(log),),
        "user_features": str(users),
        "out": str(tmp_path / "out"),
        "split_time": SPLIT_TIME,
    }
    with pytest.raises(DataError, match="malformed line"):
        convert_kuairand(KuaiRandOptions(**options))
    manifest = convert_kuairand(KuaiRandOptions(**options, on_bad_rows="skip", overwrite=True))
    assert manifest["input"]["rows"] == 10 and manifest["input"]["skipped"] == 1
    assert manifest["input"]["as_candidate"] == 9

    with pytest.raises(DataError) as error:
        convert_kuairand(
            KuaiRandOptions(**options, column_map=(("is_like", "label"),), overwrite=True)
        )
    assert "label" in str(error.value) and "--column-map" in str(error.value)


def test_refuses_to_overwrite(tmp_path):
    convert(tmp_path)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(tmp_path)


def test_failed_run_leaves_nothing_behind(tmp_path):
    """A run that stops on bad input leaves no train/ or eval/ behind: the re-run on fixed
    input needs no --overwrite. An --overwrite run that fails keeps the previous output."""
    log, users, _ = write_inputs(tmp_path)
    good_users = users.read_text()
    users.write_text(good_users.replace("7,high_active", "x7,high_active"))
    options = small_options(tmp_path, log, users)
    with pytest.raises(DataError, match="not a whole number") as error:
        convert_kuairand(KuaiRandOptions(**options))
    assert error.value.path == str(users) and error.value.line == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()  # an existing OUT: kept, and left as it was
    with pytest.raises(DataError):
        convert_kuairand(KuaiRandOptions(**options))
    assert list((tmp_path / "out").iterdir()) == []

    users.write_text(good_users)
    manifest = convert_kuairand(KuaiRandOptions(**options))
    assert manifest["splits"]["train"]["rows"] == 4
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eval", "manifest.json", "profile_codes.json", "train"
    ]

    users.write_text(good_users.replace("7,high_active", "x7,high_active"))
    with pytest.raises(DataError):
        convert_kuairand(KuaiRandOptions(**options, overwrite=True))
    assert len(rows(tmp_path / "out", "train")) == 4
    assert (tmp_path / "out" / "manifest.json").exists()
    assert not (tmp_path / "out" / "_incomplete").exists()


def test_empty_directories_of_an_old_failed_run_are_not_an_output(tmp_path):
    for split in ("train", "eval"):
        (tmp_path / "out" / split).mkdir(parents=True)
    assert convert(tmp_path)["splits"]["eval"]["rows"] == 2


def test_empty_train_split_is_an_error_that_says_what_to_change(tmp_path):
    """Two interactions within one minute: the default split (whole minutes, --eval-fraction
    0.1) puts both in eval."""
    log, users, _ = write_inputs(tmp_path)
    lines = [log_line(3, 101, 1_000_000_500, 1, 10), log_line(3, 102, 1_000_010_500, 1, 10)]
    log.write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    options = {"logs": (str(log),), "user_features": str(users), "out": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="the train split is empty") as error:
        convert_kuairand(KuaiRandOptions(**options))
    message = str(error.value)
    assert "--split-time" in message and "--eval-fraction 0.1" in message
    assert "from 1000000 (1970-01-12T13:46:40+00:00) to 1000010" in message
    assert not (tmp_path / "out").exists()
    # What the message suggests: a split time inside the range.
    manifest = convert_kuairand(KuaiRandOptions(**options, split_time=1_000_005))
    assert [manifest["splits"][s]["rows"] for s in ("train", "eval")] == [1, 1]
    assert manifest["warnings"] == []


def test_empty_eval_split_is_an_error_unless_asked_for(tmp_path):
    with pytest.raises(ValueError, match="the eval split is empty") as error:
        convert(tmp_path, split_time=2_000_000)
    assert "--eval-fraction 0 without --split-time" in str(error.value)
    manifest = convert(tmp_path, split_time=None, eval_fraction=0.0)
    assert manifest["splits"]["eval"]["rows"] == 0 and manifest["splits"]["train"]["rows"] > 0
    (warning,) = manifest["warnings"]
    assert "eval split is empty (--eval-fraction 0)" in warning
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["warnings"] == [warning]


def _launch():
    spec = importlib.util.spec_from_file_location("launch", REPO / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def subset_out(tmp_path_factory):
    if not SUBSET_LOG.exists():
        pytest.skip(f"shared KuaiRand subset not found at {SUBSET_LOG}")
    out = tmp_path_factory.mktemp("kuairand_subset")
    code = _launch().main(
        [
            "prepare",
            "kuairand",
            "--log",
            str(SUBSET_LOG),
            "--user-features",
            str(PURE_USERS),
            "--video-features",
            str(PURE_VIDEOS),
            "--out",
            str(out),
            "--overwrite",
            "--column-map",
            "is_like=label",
            "is_hate=1-label",
        ]
    )
    assert code == 0
    return out


def test_shared_subset_converts_and_accounts_for_every_row(subset_out):
    manifest = json.loads((subset_out / "manifest.json").read_text())
    with open(SUBSET_LOG) as log:
        input_rows = sum(1 for _ in log) - 1
    assert manifest["input"]["rows"] == input_rows == 41_828
    accounted = (
        manifest["input"]["as_candidate"]
        + manifest["input"]["history_only"]
        + manifest["input"]["skipped"]
    )
    assert accounted == input_rows
    assert manifest["users"]["total"] == 664 and manifest["users"]["without_profile"] == 0
    # Profile table sizes are checked against the recipes below; all else is checked here.
    features, labels = schema.sample_specs(mtgr=True, profile_buckets={})
    total_candidates = 0
    for split in ("train", "eval"):
        info = manifest["splits"][split]
        table = pq.read_table([subset_out / f for f in info["files"]])
        assert table.num_rows == info["rows"]
        uih = sum(len(v) for v in table.column("uih_seq__video_id").to_pylist())
        cand = sum(len(v) for v in table.column("cand_seq__video_id").to_pylist())
        assert (uih, cand) == (info["uih_tokens"], info["candidate_tokens"])
        assert sum(info["length_histogram"]["candidates"]) == info["rows"]
        total_candidates += cand
        validate_table(table, features, labels)
        # Labels: like (bit 2) xor hate (bit 32), from label / 1 - label.
        bits = np.concatenate(
            [np.asarray(v) for v in table.column("cand_seq__action_weight").to_pylist()]
        )
        assert np.all(((bits & 2) > 0) != ((bits & 32) > 0))
    assert total_candidates == manifest["input"]["as_candidate"]
    # Eval candidates are the latest ~10% of interactions.
    assert 0.05 < manifest["splits"]["eval"]["candidate_tokens"] / input_rows < 0.15


@pytest.mark.parametrize("recipe", ["kuairand_dlrm_hstu", "kuairand_mtgr"])
def test_shared_subset_reads_with_the_recipes(subset_out, recipe):
    """The converted subset passes the recipes' checks, profile table sizes included."""
    from hstu.config import feature_specs, label_specs, load_config

    cfg = load_config(str(REPO / "recipes" / f"{recipe}.config"))
    table = pq.read_table(subset_out / "train")
    validate_table(table, feature_specs(cfg), label_specs(cfg))
    manifest = json.loads((subset_out / "manifest.json").read_text())
    buckets = {spec.name: spec.num_buckets for spec in feature_specs(cfg)}
    for column in schema.PROFILE_COLUMNS:
        assert manifest["max_values"][column] < buckets[column], column


def test_subset_video_ids_fit_the_recipe_table(subset_out):
    manifest = json.loads((subset_out / "manifest.json").read_text())
    assert manifest["max_values"]["video_id"] < 10_000_000  # taken modulo 10M
    assert os.path.exists(subset_out / "profile_codes.json")


@pytest.mark.slow
def test_ray_tasks_give_the_same_samples(ray_local, tmp_path):
    """--workers 2: files and buckets as Ray tasks; several buckets; same rows as one process."""
    for name in ("one", "many"):
        (tmp_path / name).mkdir()
    convert(tmp_path / "one")
    convert(tmp_path / "many", workers=2, buckets=3)
    for split in ("train", "eval"):
        one = pq.read_table(tmp_path / "one" / "out" / split).sort_by("sample_id")
        many = pq.read_table(tmp_path / "many" / "out" / split).sort_by("sample_id")
        assert one.equals(many)
    assert len(list((tmp_path / "many" / "out" / "train").glob("*.parquet"))) == 3


def test_subset_with_the_cpu_recipes_options_fits_that_recipe(tmp_path):
    """recipes/kuairand_subset_cpu.config: the prepare command in its header gives samples
    whose ids fit its tables and whose rows fit its max_seq_len."""
    from hstu.config import feature_specs, label_specs, load_config

    if not SUBSET_LOG.exists():
        pytest.skip(f"shared KuaiRand subset not found at {SUBSET_LOG}")
    cfg = load_config(str(REPO / "recipes" / "kuairand_subset_cpu.config"))
    out = tmp_path / "subset"
    argv = ["prepare", "kuairand", "--log", str(SUBSET_LOG), "--user-features", str(PURE_USERS),
            "--column-map", "is_like=label", "is_hate=1-label", "--max-seq-len", "256",
            "--max-candidates", "20", "--video-id-buckets", "100000", "--out", str(out)]
    assert _launch().main(argv) == 0
    features, labels = feature_specs(cfg), label_specs(cfg)
    contextual = len([s for s in features if s.sequence is None])
    for split in ("train", "eval"):
        table = pq.read_table(out / split)
        validate_table(table, features, labels)
        lengths = [
            contextual + len(uih) + len(cand)
            for uih, cand in zip(
                table.column("uih_seq__video_id").to_pylist(),
                table.column("cand_seq__video_id").to_pylist(),
            )
        ]
        assert max(lengths) <= cfg.model_config.dlrm_hstu.max_seq_len
