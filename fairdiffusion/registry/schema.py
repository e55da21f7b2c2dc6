"""Every name that MLflow holds for the pipeline, defined once: tags, aliases, artifacts, statuses.

The pipeline writes these names and ``approve``, ``rollback``, ``audit`` and the next
run's skip check read them back; a name typed twice could drift apart and break those
readers silently. Nothing outside this module spells an ``fd.`` key
(``tests/fairdiffusion/registry/test_schema.py`` checks).
"""

from __future__ import annotations

# Tags on the pipeline run. The data and code tags are also copied onto the model version.
DATA_TAG_PREFIX = "fd.data."
DATA_MD5 = "fd.data.dvc_md5"
DATA_DVC_COMMIT = "fd.data.data_dvc_commit"
DATA_PATH = "fd.data.path"
DATA_DVC_FILE = "fd.data.dvc_file"
BASE_TAG_PREFIX = "fd.base."
BASE_MD5 = "fd.base.dvc_md5"
BASE_DVC_COMMIT = "fd.base.base_dvc_commit"
BASE_PATH = "fd.base.path"
BASE_DVC_FILE = "fd.base.dvc_file"
CODE_TAG_PREFIX = "fd.code."
CODE_GIT_COMMIT = "fd.code.git_commit"
CODE_DIRTY = "fd.code.dirty"
CONFIG_SHA256 = "fd.config.sha256"
SKIPPED = "fd.skipped"
SKIP_REASON = "fd.skip.reason"
VALIDATION_SUCCESS = "fd.validation.success"
VALIDATION_FAILED_EXPECTATIONS = "fd.validation.failed_expectations"
VALIDATION_FORMAT = "fd.validation.format"
VALIDATION_EXCLUDED = "fd.validation.excluded"
VALIDATION_SYNTHETIC = "fd.validation.synthetic"
VALIDATION_REFERENCE = "fd.validation.reference"
VALIDATION_ACKNOWLEDGED_SHIFTS = "fd.validation.acknowledged_shifts"
TRAINING_METHOD = "fd.training.method"
REGISTRY_VERSION = "fd.registry.version"
#: The process (``host:pid``) that opened the run; once it is gone, a later run that
#: finds the run still RUNNING ends it as KILLED and says why in ``fd.run.end_reason``.
RUN_OWNER = "fd.run.owner"
RUN_END_REASON = "fd.run.end_reason"
#: The pyfunc model logged on the run, set right after logging so that a retry reuses it.
MODEL_URI = "fd.model.uri"
MODEL_ID = "fd.model.id"
#: The Prefect flow run that opened the run: a retried ``open_tracking_run`` finds it by this.
FLOW_RUN_ID = "fd.flow_run_id"
#: What the pipeline did with the run's candidate, once known: one of the ``VERDICT_*`` below.
#: A column in the MLflow UI's run table; the model version's status is derived elsewhere.
GATE_VERDICT = "fd.gate.verdict"
VERDICT_PROMOTED = "promoted"
VERDICT_AWAITING_APPROVAL = "awaiting-approval"
VERDICT_REJECTED = "rejected"
VERDICT_SKIPPED = "skipped"

# MLflow's own tags and dataset-input context (mlflow.utils.mlflow_tags), which its UI shows
# as the run's Source and its Datasets' context.
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_DATASET_CONTEXT = "mlflow.data.context"
#: The run's source: the flow every pipeline run (CLI or deployment) executes, at the commit above.
PIPELINE_SOURCE_NAME = "flows/pipeline.py"
#: The dataset inputs' contexts: the training data, and the base model's weights (versioned like data).
DATASET_CONTEXT_TRAINING = "training"
DATASET_CONTEXT_BASE_MODEL = "base-model"

# Tags on the model version: the gate's verdict, the status, and the latest decision.
GATE_PASSED = "fd.gate.passed"
GATE_REASONS = "fd.gate.reasons"
GATE_POLICY = "fd.gate.policy"
GATE_POLICY_FILE = "fd.gate.policy_file"
GATE_POLICY_HASH = "fd.gate.policy_hash"
GATE_COMPARED_WITH_VERSION = "fd.gate.compared_with_version"
GATE_DECIDED_AT = "fd.gate.decided_at"
STATUS = "fd.status"
LATEST_DECISION = "fd.decision.latest"
LATEST_DECISION_AT = "fd.decision.latest_at"
LATEST_DECISION_ACTOR = "fd.decision.latest_actor"
LATEST_DECISION_REASONS = "fd.decision.latest_reasons"
LATEST_DECISION_AUDIT_RUN = "fd.decision.latest_audit_run"

# Tags on an audit run (one immutable run per decision, in the audit experiment).
AUDIT_MODEL = "fd.audit.model"
AUDIT_VERSION = "fd.audit.version"
AUDIT_DECISION = "fd.audit.decision"
AUDIT_ACTOR = "fd.audit.actor"
AUDIT_AT = "fd.audit.at"
AUDIT_REASONS = "fd.audit.reasons"
AUDIT_DATA_MD5 = "fd.audit.data_md5"
AUDIT_POLICY_HASH = "fd.audit.policy_hash"
AUDIT_CHAMPION_BEFORE = "fd.audit.champion_before"
AUDIT_CHAMPION_AFTER = "fd.audit.champion_after"

# The run parameter holding the training method (the resolved config, flattened).
TRAINING_METHOD_PARAM = "training.method"

# Aliases of the registered model, and the suffix of its promotion lock's name.
CHAMPION = "champion"
CANDIDATE = "candidate"
PREVIOUS_CHAMPION = "previous-champion"

# Artifacts of the pipeline run.
CONFIG_ARTIFACT = "lineage/config.json"
DATA_VERSION_ARTIFACT = "lineage/data_version.json"
VALIDATION_ARTIFACT = "lineage/validation.json"
TRAINING_ARTIFACT = "lineage/training.json"
GATE_POLICY_ARTIFACT = "lineage/gate_policy.yaml"
GATE_DECISION_ARTIFACT = "lineage/gate_decision.json"
DATA_DOCS_DIR = "validation/data_docs"
TRAINING_DIR = "training"
#: The folder ``fairdiffusion report --version N`` downloads; it holds the files below.
EVALUATION_DIR = "evaluation"
EVALUATION_JSON = "evaluation.json"
EVALUATION_ARTIFACT = f"{EVALUATION_DIR}/{EVALUATION_JSON}"
EVALUATION_MARKDOWN_ARTIFACT = f"{EVALUATION_DIR}/report.md"
EVALUATION_HTML_ARTIFACT = f"{EVALUATION_DIR}/report.html"
#: The logged pyfunc model's name on the run.
MODEL_ARTIFACT = "model"
#: The decision, as JSON, on its audit run.
DECISION_ARTIFACT = "decision.json"
#: The version's fairness model card (:mod:`fairdiffusion.registry.model_card`): on the run,
#: and as ``README.md`` in the saved pipeline folder (diffusers' model-card convention).
MODEL_CARD_FILE = "README.md"
MODEL_CARD_ARTIFACT = f"model_card/{MODEL_CARD_FILE}"

# A model version's status (``PromotionOutcome.status``; derived from the aliases and the
# decision log at read time by :mod:`fairdiffusion.registry.status`; the ``fd.status`` tag
# only mirrors it for the MLflow UI and is never read back).
STATUS_CHAMPION = "champion"
STATUS_AWAITING_APPROVAL = "awaiting-approval"
STATUS_REJECTED = "rejected"
#: Was champion once (a decision left it so), is not now.
STATUS_REPLACED = "replaced"
#: No decision on the version in the log (e.g. registered by hand).
STATUS_UNRECORDED = "unrecorded"
#: A run that trained nothing; never on a model version.
STATUS_SKIPPED = "skipped"

# A decision on a model version (``DecisionRecord.decision``).
DECISION_PASS = "pass"
DECISION_FAIL = "fail"
DECISION_APPROVAL = "approval"
DECISION_OVERRIDE = "override"
DECISION_ROLLBACK = "rollback"
#: The pipeline's own decisions: exactly one of them per registered version.
GATE_DECISIONS = (DECISION_PASS, DECISION_FAIL)

# Tags on a generation run of ``fairdiffusion generations`` (self-consuming retraining):
# its generation, regime, the run it descends from and the ceiling it lifted, if any.
GENERATION = "fd.generation"
GENERATION_PARENT_RUN = "fd.generation.parent_run_id"
GENERATION_PARENT_MODEL = "fd.generation.parent_model"
GENERATION_REGIME = "fd.generation.regime"
GENERATION_DATA_SHA256 = "fd.generation.data_sha256"
#: ``generations.max_synthetic_share``, or ``none`` when the experiment lifted no ceiling.
GENERATION_MAX_SYNTHETIC_SHARE = "fd.generations.max_synthetic_share"
GENERATION_MADNESS_PASSED = "fd.generation.madness_passed"
