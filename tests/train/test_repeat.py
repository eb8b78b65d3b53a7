"""Numbers with variance: the same seed repeats a run's AUCs exactly on CPU, `--repeat K` runs
K seeds as MLflow child runs of a parent that logs mean and standard deviation, and `compare`
shows them as mean ± std."""

from __future__ import annotations

import math
import statistics

import pytest

from hstu.train import tracking
from hstu.train.repeat import Spread, format_spread, spread, spreads

BATCH = 8


def test_spread_is_the_mean_and_sample_standard_deviation_of_the_finite_values():
    assert spread([0.60, 0.64, 0.62]) == Spread(0.62, statistics.stdev([0.60, 0.64, 0.62]), 3)
    assert spread([0.60, 0.64, 0.62]).std == pytest.approx(0.02)
    nan = spread([math.nan, math.nan])
    assert nan.n == 0 and math.isnan(nan.mean) and math.isnan(nan.std)
    assert format_spread(Spread(0.6234, 0.0123, 3)) == "0.6234 ± 0.0123"
    assert format_spread(Spread(0.6234, math.nan, 1)) == "0.6234"
    found = spreads([{"eval/auc/a": 0.5, "eval/rows": 10, "global_step": 4},
                     {"eval/auc/a": 0.7, "eval/rows": 10, "global_step": 4}])
    assert set(found) == {"eval/auc/a"}  # per-task eval metrics only
    assert found["eval/auc/a"].mean == pytest.approx(0.6)


def test_compare_shows_a_repeat_parent_as_mean_plus_minus_std(tmp_path):
    from hstu.cli.compare import comparison

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    single = tracking.start_run(uri, "exp", "single", tags={}, params={"lr": "0.1"})
    tracking.RunLogger(uri, single).metrics({"eval/auc/is_click": 0.61}, step=4)
    parent = tracking.start_run(uri, "exp", "parent", tags={"hstu.seeds": "0,1,2"},
                                params={"lr": "0.1"})
    tracking.RunLogger(uri, parent).metrics(
        {"mean/eval/auc/is_click": 0.6234, "std/eval/auc/is_click": 0.0123,
         "repeat/runs": 3.0}, step=0)
    mlflow_client = tracking.client(uri)
    lines = comparison([mlflow_client.get_run(single), mlflow_client.get_run(parent)]).splitlines()
    auc = next(line for line in lines if line.startswith("eval/auc/is_click"))
    assert auc.split() == ["eval/auc/is_click", "0.61", "0.6234", "±", "0.0123"]
    seeds = next(line for line in lines if line.startswith("seeds"))
    assert seeds.split()[-2:] == ["-", "0,1,2"]
    assert not any(line.startswith(("mean/", "std/")) for line in lines)


def test_repeat_refuses_fewer_than_two_runs_before_ray_starts(launch_main, smoke_recipe, capsys):
    assert launch_main(["train", "--recipe", smoke_recipe, "--repeat", "1"]) == 1
    assert capsys.readouterr().err.startswith(
        "launch.py train: --repeat 1: a spread needs at least 2 runs")


@pytest.fixture(scope="module")
def repeated(launch_main, ray_session, smoke_data, smoke_recipe, mlflow_uri, tmp_path_factory):
    """`train --repeat 2` (seeds 0 and 1) on 2 workers, then one more run with seed 0."""
    root = tmp_path_factory.mktemp("repeat")
    common = ["train", "--recipe", smoke_recipe, "--train", smoke_data["train"], "--eval",
              smoke_data["eval"], "--workers", "2", "--storage", str(root / "runs"),
              "--mlflow-uri", mlflow_uri, "--no-export",
              "--set", f"data_config.batch_size={BATCH}", "--set", "train_config.num_epochs=1",
              "--set", "train_config.log_step_count_steps=4"]
    assert launch_main([*common, "--repeat", "2", "--run-name", "rep"]) == 0
    assert launch_main([*common, "--seed", "0", "--run-name", "again-seed0"]) == 0
    mlflow_client = tracking.client(mlflow_uri)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]

    def by_name(name):
        return mlflow_client.search_runs(
            experiments, filter_string=f"attributes.run_name = '{name}'")[0]

    return {name: by_name(name) for name in ("rep", "rep-seed0", "rep-seed1", "again-seed0")}


EVAL_KEYS = ("eval/auc/", "eval/loss/")


def _eval(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith(EVAL_KEYS)}


@pytest.mark.slow
def test_the_same_seed_repeats_the_same_aucs_to_the_last_digit(repeated):
    first, again = _eval(repeated["rep-seed0"]), _eval(repeated["again-seed0"])
    assert len(first) == 16  # 8 tasks x (AUC, loss)
    for key, value in first.items():
        assert (math.isnan(value) and math.isnan(again[key])) or value == again[key], key
    # Another seed trains another model: the numbers move.
    other = _eval(repeated["rep-seed1"])
    assert any(other[k] != v for k, v in first.items() if not math.isnan(v))


@pytest.mark.slow
def test_repeat_logs_children_under_a_parent_with_mean_and_std(repeated):
    parent = repeated["rep"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hstu.seeds"] == "0,1"
    assert parent.data.metrics["repeat/runs"] == 2
    children = [repeated["rep-seed0"], repeated["rep-seed1"]]
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    for key, value in _eval(children[0]).items():
        values = [value, children[1].data.metrics[key]]
        if any(math.isnan(v) for v in values):
            continue
        assert parent.data.metrics[f"mean/{key}"] == pytest.approx(statistics.fmean(values))
        assert parent.data.metrics[f"std/{key}"] == pytest.approx(statistics.stdev(values))


@pytest.mark.slow
def test_compare_of_the_parent_shows_mean_plus_minus_std(repeated, launch_main, mlflow_uri,
                                                          capsys):
    assert launch_main(["compare", "rep", "again-seed0", "--mlflow-uri", mlflow_uri,
                        "--metrics", "eval/auc/is_click"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("eval/auc/is_click"))
    parent = repeated["rep"].data.metrics
    mean, std = parent["mean/eval/auc/is_click"], parent["std/eval/auc/is_click"]
    assert f"{mean:.4f} ± {std:.4f}" in line
