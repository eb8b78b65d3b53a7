"""`launch.py predict --cache` and the pyfunc model's cached mode on a stream of requests: each
user's rows in request order, the history growing from row to row. Exact mode must give the
uncached export's scores; incremental mode must append to the cache."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def stream_table(samples) -> pa.Table:
    """Three requests per eval user: the history without its last 6 actions, without its last
    3, and whole; same candidates and query time. Users interleaved, each in order."""
    table = pq.read_table(min(samples["eval"].glob("*.parquet")))
    rows = table.to_pylist()
    rows = [row for row in rows if len(row["uih_seq__video_id"]) >= 8][:4]
    assert len(rows) >= 3
    out = []
    for cut in (6, 3, 0):
        for index, row in enumerate(rows):
            request = dict(row)
            n = len(row["uih_seq__video_id"]) - cut
            for name, value in row.items():
                if name.startswith("uih_seq__"):
                    request[name] = value[:n]
            request["sample_id"] = row["sample_id"] * 10 + (6 - cut) // 3
            out.append(request)
    return pa.Table.from_pylist(out, schema=table.schema)


@pytest.fixture(scope="module")
def stream_file(samples, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "requests.parquet"
    pq.write_table(stream_table(samples), path)
    return path


def scores_of(path):
    return pq.read_table(path).column("probs_is_click").to_pylist()


def test_predict_cache_exact_equals_uncached(smoke_export, stream_file, tmp_path, capsys,
                                             launch_main, reuse_smoke_predictor):
    plain, cached = tmp_path / "plain.parquet", tmp_path / "cached.parquet"
    base = ["predict", "--export_dir", str(smoke_export.export_dir), "--data", str(stream_file),
            "--batch-size", "5", "--quiet"]
    assert launch_main(base + ["--out", str(plain)]) == 0
    capsys.readouterr()
    assert launch_main(base + ["--out", str(cached), "--cache", "exact"]) == 0
    summary = json.loads(capsys.readouterr().out)
    cache = summary["cache"]
    rows = summary["rows_out"]
    assert cache["mode"] == "exact" and cache["rows"] == rows
    # The first row of each user is encoded; later rows moved (new actions): re-encoded,
    # as exactness demands for this model (contextual tokens, 2 layers).
    assert cache["no_entry"] == rows // 3 and cache["not_exact"] == rows - rows // 3
    for got, want in zip(scores_of(cached), scores_of(plain)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert pq.read_table(cached).column("sample_id").to_pylist() == \
        pq.read_table(plain).column("sample_id").to_pylist()


def test_predict_cache_incremental_appends(smoke_export, stream_file, tmp_path, capsys,
                                           launch_main, reuse_smoke_predictor):
    plain, cached = tmp_path / "plain.parquet", tmp_path / "cached.parquet"
    base = ["predict", "--export_dir", str(smoke_export.export_dir), "--data", str(stream_file),
            "--quiet"]
    assert launch_main(base + ["--out", str(plain)]) == 0
    capsys.readouterr()
    assert launch_main(base + ["--out", str(cached), "--cache", "incremental",
                               "--cache-max-stale-seconds", "100000000"]) == 0
    cache = json.loads(capsys.readouterr().out)["cache"]
    users = cache["rows"] // 3
    assert cache["reused_stale"] == 2 * users and cache["appended_tokens"] == 6 * users
    first_rows = slice(0, users)  # encoded from scratch: exact
    for got, want in zip(scores_of(cached)[first_rows], scores_of(plain)[first_rows]):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # Later rows: approximate (random weights; docs/serving.md has the measured sizes).
    worst = max(float(np.max(np.abs(np.array(g) - np.array(w))))
                for g, w in zip(scores_of(cached), scores_of(plain)))
    assert 0 < worst < 0.2
    # The stream only appends: checking the cached histories' ends alone finds the same
    # reuses and gives the same scores.
    ends = tmp_path / "ends.parquet"
    assert launch_main(base + ["--out", str(ends), "--cache", "incremental",
                               "--cache-max-stale-seconds", "100000000",
                               "--cache-history-check", "ends"]) == 0
    assert json.loads(capsys.readouterr().out)["cache"] == cache
    assert scores_of(ends) == scores_of(cached)


def test_predict_cache_options_are_checked(smoke_export, stream_file, tmp_path, capsys,
                                           launch_main):
    code = launch_main(["predict", "--export_dir", str(smoke_export.export_dir), "--data",
                        str(stream_file), "--out", str(tmp_path / "x.parquet"), "--cache",
                        "exact", "--cache-max-mb", "0"])
    assert code == 1
    assert "--cache-max-mb must be > 0" in capsys.readouterr().err


def test_pyfunc_cached_mode(smoke_export, stream_file, smoke_predictor, tmp_path):
    import mlflow

    from hstu.export import pyfunc_model

    path = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(path), python_model=pyfunc_model.__file__,
        artifacts={pyfunc_model.EXPORT_ARTIFACT: str(smoke_export.export_dir)},
        model_config=dict(pyfunc_model.DEFAULT_MODEL_CONFIG),  # as mlflow_logging logs it
    )
    frame = pq.read_table(stream_file).to_pandas()
    expected = smoke_predictor.predict_table(pq.read_table(stream_file)).to_pandas()
    model = mlflow.pyfunc.load_model(str(path), model_config={"cache": "exact",
                                                              "cache_max_mb": 64})
    # Requests arrive one call at a time; the cache lives in the loaded model between calls.
    got = [model.predict(frame.iloc[[index]]) for index in range(len(frame))]
    for index, scores in enumerate(got):
        np.testing.assert_allclose(scores["probs_is_click"][0],
                                   expected["probs_is_click"][index], atol=1e-5, rtol=0)
    predictor = model.unwrap_python_model().predictor
    assert predictor.cache_summary()["rows"] == len(frame)
    assert predictor.cached.policy.history_check == "full"
    ends = mlflow.pyfunc.load_model(str(path), model_config={"cache": "exact",
                                                             "cache_history_check": "ends"})
    assert ends.unwrap_python_model().predictor.cached.policy.history_check == "ends"
    with pytest.raises(ValueError, match="cache mode 'fast'"):
        mlflow.pyfunc.load_model(str(path), model_config={"cache": "fast"})
