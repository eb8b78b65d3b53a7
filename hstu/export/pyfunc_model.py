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
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

EXPORT_ARTIFACT = "export_dir"


class HSTURankerModel(PythonModel):
    def load_context(self, context) -> None:
        from hstu.export.predict import Predictor

        self.predictor = Predictor(context.artifacts[EXPORT_ARTIFACT])

    # pd.DataFrame is a hint MLflow infers no schema from, so it converts nothing (a schema-
    # bearing hint would make MLflow convert the input by its own rules, and no hint at all
    # makes it print a warning): dataframe_to_table checks and converts every column itself.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        from hstu.export.predict import dataframe_to_table

        table = dataframe_to_table(model_input, self.predictor)
        return self.predictor.predict_table(table, source="model_input").to_pandas()


mlflow.models.set_model(HSTURankerModel())
