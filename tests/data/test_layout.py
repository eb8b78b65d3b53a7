"""hstu/data/layout.py and `prepare synthetic|kuairand --recipe`: samples in the columns,
names and encodings a recipe reads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hstu.config import load_config
from hstu.data import schema
from hstu.data.layout import apply_layout, plan_layout
from hstu.data.synthetic import SyntheticOptions, generate, generate_shard, make_world
from hstu.data.validate import validate_table

REPO = Path(__file__).resolve().parents[2]
TZREC = REPO / "tests" / "config" / "tzrec_configs"
BENCHMARK = TZREC / "dlrm_hstu.config"
ONE_K = TZREC / "dlrm_hstu_kuairand_1k.config"
SMALL_TABLES_27K = [
    "feature_configs[video_id].sequence_id_feature.num_buckets=500",
    "feature_configs[item_video_id].sequence_id_feature.num_buckets=500",
    "feature_configs[user_id].id_feature.num_buckets=100",
]
SMALL = SyntheticOptions(
    users=12, items=400, max_history=30, median_history=10, max_candidates=5,
    eval_fraction=0.5, users_per_shard=12, clusters=20,
)


@pytest.fixture
def launch(launch_main):
    """launch.py's main, in this process, taking its arguments one by one."""
    return lambda *args: launch_main(list(args))


@pytest.fixture(scope="module")
def sample_table() -> pa.Table:
    """Rows in this project's sample schema (what apply_layout rewrites)."""
    table, _ = generate_shard(SMALL, make_world(SMALL), 0)["train"]
    return table


def test_benchmark_layout_reads_standalone_columns_by_role(sample_table):
    layout = plan_layout(load_config(BENCHMARK, SMALL_TABLES_27K), str(BENCHMARK))
    roles = {plan.column: plan.source for plan in layout.columns}
    assert roles == {
        "video_id": schema.UIH_VIDEO_ID,
        "item_video_id": schema.CAND_VIDEO_ID,
        "action_weight": schema.UIH_ACTION_WEIGHT,
        "watch_time": schema.UIH_WATCH_TIME,
        "action_timestamp": schema.UIH_ACTION_TIMESTAMP,
        "item_query_time": schema.CAND_QUERY_TIME,
        "user_id": "user_id",
        **{name: name for name in schema.PROFILE_COLUMNS},
        # Both label_fields, the second used by no task (TorchEasyRec reads it anyway).
        "item_action_weight": schema.CAND_ACTION_WEIGHT,
        "item_target_watchtime": schema.CAND_WATCH_TIME,
    }
    out = apply_layout(sample_table, layout)
    assert out.column_names == ["sample_id", *roles]
    # The same values, under the recipe's names.
    assert out.column("item_video_id").equals(sample_table.column(schema.CAND_VIDEO_ID))
    assert out.column("watch_time").type == pa.list_(pa.float32())
    validate_table(out, list(layout.features), list(layout.labels))


def test_string_encoding_joins_feature_sequences_and_keeps_labels_lists(sample_table):
    layout = plan_layout(load_config(ONE_K), str(ONE_K), encoding="string")
    out = apply_layout(sample_table, layout)
    # fg_mode FG_DAG: columns from the expressions, "|" from sequence_delim.
    first = sample_table.column(schema.UIH_VIDEO_ID)[0].as_py()
    assert out.column("uih_seq__video_id")[0].as_py() == "|".join(map(str, first))
    assert out.column("cand_seq__query_time").type == pa.string()
    assert out.column("cand_seq__action_weight").type == pa.list_(pa.int64())
    assert out.column("user_id").type == pa.int64()
    validate_table(out, list(layout.features), list(layout.labels))


def test_side_info_without_a_sample_column_is_a_stand_in_from_the_item(sample_table, tmp_path):
    author = (
        'id_feature {\n        feature_name: "video_author"\n        expression: "item:video_author"'
        "\n        embedding_dim: 32\n        num_buckets: 7\n      }\n    }\n    features {\n"
        "      raw_feature"
    )
    query_time = 'raw_feature {\n        feature_name: "query_time"'
    text = ONE_K.read_text()
    assert text.count(query_time) == 1
    text = text.replace(query_time, author + query_time.removeprefix("raw_feature"))
    text = text.replace(
        'feature_names: "cand_seq__video_id"\n',
        'feature_names: "cand_seq__video_id"\n    feature_names: "cand_seq__video_author"\n',
    )
    recipe = tmp_path / "author.config"
    recipe.write_text(text)
    layout = plan_layout(load_config(recipe), str(recipe))
    plan = next(p for p in layout.columns if p.column == "cand_seq__video_author")
    assert (plan.source, plan.derived) == (schema.CAND_VIDEO_ID, True)
    out = apply_layout(sample_table, layout)
    videos = sample_table.column(schema.CAND_VIDEO_ID).combine_chunks().flatten().to_numpy()
    authors = out.column("cand_seq__video_author").combine_chunks().flatten().to_numpy()
    assert (authors == videos % 7).all()


def test_an_id_too_large_for_the_recipe_names_the_set_that_fits_it(sample_table):
    small = [*SMALL_TABLES_27K[:2], "feature_configs[user_id].id_feature.num_buckets=5"]
    layout = plan_layout(load_config(BENCHMARK, small), str(BENCHMARK))
    with pytest.raises(ValueError) as error:
        apply_layout(sample_table, layout)
    assert "column 'user_id'" in str(error.value)
    assert "num_buckets 5" in str(error.value)
    assert "--set feature_configs[8].id_feature.num_buckets=" in str(error.value)


def test_generate_with_a_layout_writes_the_recipes_columns_and_manifest(tmp_path):
    layout = plan_layout(load_config(BENCHMARK, SMALL_TABLES_27K), str(BENCHMARK))
    manifest = generate(SMALL, tmp_path, layout=layout)
    written = pq.read_table(tmp_path / "train" / "part-00000.parquet")
    assert set(written.column_names) == {"sample_id", *(p.column for p in layout.columns)}
    assert manifest["layout"]["recipe"] == str(BENCHMARK)
    assert json.loads((tmp_path / "manifest.json").read_text())["schema"]["video_id"] == (
        "list<item: int64>"
    )


def test_prepare_synthetic_recipe_cli(launch, tmp_path, capsys):
    out = tmp_path / "data"
    code = launch(
        "prepare", "synthetic", "--out", str(out), "--users", "20", "--max-candidates", "4",
        "--median-history", "8", "--recipe", str(BENCHMARK), "--encoding", "string",
        *[arg for item in SMALL_TABLES_27K for arg in ("--set", item)],
    )
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    # --items defaulted to the item table (500 buckets), histories to max_seq_len's room.
    assert manifest["options"]["items"] == 499
    assert manifest["options"]["max_history"] == 8000 - 6 - 4
    assert manifest["schema"]["item_video_id"] == "string"
    table = pq.read_table(out / "train")
    assert table.column("video_id").type == pa.string()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--items", "500"], "pass --items 499 or less"),
        (["--users", "100"], "pass --users 99 or less"),
    ],
)
def test_prepare_synthetic_refuses_ids_beyond_the_recipes_tables(launch, tmp_path, capsys,
                                                                 extra, message):
    args = ["prepare", "synthetic", "--out", str(tmp_path / "d"), "--users", "20",
            "--recipe", str(BENCHMARK), *[a for s in SMALL_TABLES_27K for a in ("--set", s)]]
    if extra[0] == "--users":
        args[args.index("--users") + 1] = extra[1]
    else:
        args += extra
    assert launch(*args) == 1
    err = capsys.readouterr().err
    assert err.startswith("launch.py prepare synthetic: ") and message in err


def test_encoding_string_needs_a_recipe(launch, tmp_path, capsys):
    code = launch("prepare", "synthetic", "--out", str(tmp_path), "--users", "3",
                  "--encoding", "string")
    assert code == 1
    assert "need --recipe" in capsys.readouterr().err


def test_a_recipe_error_names_the_file_line_and_field(launch, tmp_path, capsys):
    code = launch("prepare", "synthetic", "--out", str(tmp_path), "--users", "3",
                  "--recipe", str(BENCHMARK), "--set", "data_config.batch_size=0")
    assert code == 1
    assert "data_config.batch_size: must be at least 1" in capsys.readouterr().err


def test_kuairand_converter_writes_the_recipes_layout(tmp_path):
    from hstu.data.kuairand import KuaiRandOptions, convert_kuairand

    from .test_kuairand import small_options, write_inputs

    log, users, _ = write_inputs(tmp_path)
    layout = plan_layout(load_config(BENCHMARK, SMALL_TABLES_27K), str(BENCHMARK))
    manifest = convert_kuairand(
        KuaiRandOptions(**small_options(tmp_path, log, users, layout=layout))
    )
    assert manifest["layout"]["recipe"] == str(BENCHMARK)
    assert manifest["options"]["layout"]["encoding"] == "list"
    table = pq.read_table(tmp_path / "out" / "train")
    assert set(table.column_names) == {"sample_id", *(p.column for p in layout.columns)}
    # The tiny log's videos 101..105 and 201, 202, 301: the same ids under the recipe's name.
    assert set(table.column("item_video_id").combine_chunks().flatten().to_pylist()) <= {
        101, 102, 103, 104, 105, 201, 202, 301
    }
