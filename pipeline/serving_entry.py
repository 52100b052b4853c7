"""Models-from-code entry of a registered ESFT version: MLflow runs this file to build the pyfunc
model (so loading a version never unpickles anything); `pipeline.serving` holds the model itself."""

import mlflow.models

from pipeline.serving import ESFTModel

mlflow.models.set_model(ESFTModel())
