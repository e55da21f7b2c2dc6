"""The registered pyfunc as code (MLflow's models-from-code): nothing of the model is pickled.

:func:`fairdiffusion.registry.promotion.log_model` passes this file's path as ``python_model``;
MLflow copies it into the logged model, and ``mlflow.pyfunc.load_model`` runs it to build
the model instead of unpickling one. The library never imports it: the one statement
below is the side effect that MLflow's protocol asks such a file for.
"""

from mlflow.models import set_model

from fairdiffusion.registry.serving import FairDiffusionPyfunc

set_model(FairDiffusionPyfunc())
