"""The MLflow pyfunc model of an export, logged with MLflow's "models from code".

MLflow runs this file to rebuild the model when `mlflow.pyfunc.load_model` is called: the
model object is code, never unpickled. Its one artifact is the export directory, opened with
hstu.export.predict.Predictor (which checks the manifest, the files' sha256 and that the
torch.export archive holds no pickle before loading it).

    model = mlflow.pyfunc.load_model("models:/<model id>")   # or runs:/<run id>/...
    scores = model.predict(samples_dataframe)

Input: a pandas DataFrame of sample rows, columns as in the export's sample_schema.json (list
columns as Python lists or numpy arrays). Output: a DataFrame, one row per input row: the
reserved columns (sample_id, user_id, candidate ids) when given, and `probs_<task>` lists with
one score per candidate.

Cached mode, for streams of requests per user (docs/serving.md, section 4): load with

    model = mlflow.pyfunc.load_model(uri, model_config={"cache": "exact"})   # or "incremental"

and the loaded model keeps each user's history keys and values between predict calls (keyed
by user_id, or model_config "cache_key"), within "cache_max_mb" MiB (default 2048; least
recently used users evicted first); "cache_max_stale_tokens" / "cache_max_stale_seconds" bound
the incremental mode's staleness; "cache_history_check" "ends" (default "full") recognises a
cached history by its first and last actions only (CachePolicy.history_check). It rebuilds
the model's modules with hstu.model, which imports TorchRec: the logged requirements do not
include it, so install torchrec where the cached mode runs (an ExportDirError says so
otherwise).
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

EXPORT_ARTIFACT = "export_dir"
# Logged with the model (hstu/export/mlflow_logging.py): MLflow passes a load-time model_config
# key to the model only when the logged model declares it, so every key is declared here with
# its default.
DEFAULT_MODEL_CONFIG = {
    "cache": "off",  # off | exact | incremental
    "cache_key": "user_id",
    "cache_max_mb": 2048,
    "cache_max_stale_tokens": 64,
    "cache_max_stale_seconds": 3600,
    "cache_history_check": "full",
}


class HSTURankerModel(PythonModel):
    def load_context(self, context) -> None:
        from hstu.export.predict import CachedPredictor, Predictor

        given = dict(getattr(context, "model_config", None) or {})
        unknown = sorted(set(given) - set(DEFAULT_MODEL_CONFIG))
        if unknown:
            raise ValueError(f"unknown model_config key(s) {unknown}; known: "
                             f"{', '.join(DEFAULT_MODEL_CONFIG)}")
        config = {**DEFAULT_MODEL_CONFIG, **given}
        export_dir = context.artifacts[EXPORT_ARTIFACT]
        if config["cache"] == "off":
            self.predictor = Predictor(export_dir)
            return
        from hstu.export.cached import CachePolicy

        policy = CachePolicy(
            mode=config["cache"],
            max_bytes=int(config["cache_max_mb"]) << 20,
            max_stale_tokens=int(config["cache_max_stale_tokens"]),
            max_stale_seconds=int(config["cache_max_stale_seconds"]),
            history_check=str(config["cache_history_check"]),
        )
        self.predictor = CachedPredictor(export_dir, policy=policy,
                                         key_column=str(config["cache_key"]))

    # pd.DataFrame is a hint MLflow infers no schema from, so it converts nothing (a schema-
    # bearing hint would make MLflow convert the input by its own rules, and no hint at all
    # makes it print a warning): dataframe_to_table checks and converts every column itself.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from hstu.export.predict import dataframe_to_table

        table = dataframe_to_table(model_input, self.predictor)
        return self.predictor.predict_table(table, source="model_input").to_pandas()


mlflow.models.set_model(HSTURankerModel())
