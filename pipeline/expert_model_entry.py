"""MLflow "models from code" entry: the file MLflow executes to build the pyfunc model (no pickle)."""

import mlflow.models

from pipeline.expert_model import ExpertModel

mlflow.models.set_model(ExpertModel())
