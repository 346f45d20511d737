"""MLflow "models from code" entry: the file MLflow's own loader executes to build the pyfunc model (no pickle).

Stored with every version for MLflow's tools; the pipeline's loader (`registry.load_version`) never runs the stored
copy, it builds `ExpertModel` from the installed package after verifying the version's files."""

import mlflow.models

from pipeline.expert_model import ExpertModel

mlflow.models.set_model(ExpertModel())
