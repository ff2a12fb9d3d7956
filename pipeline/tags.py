"""Every MLflow tag, artifact path and metric name that more than one module reads or writes.

One place, so that a writer and its readers cannot drift apart. Import-light: no MLflow, no Ray.
"""

# --- Run tags ---------------------------------------------------------------------------------
KIND_TAG = "pipeline.kind"  # train (untagged), tune (a search's parent run), trial, nightly
RUN_NAME_TAG = "pipeline.run_name"  # the run.name a training run resumes by
COMPLETED_TAG = "pipeline.completed"  # set last: the run has test metrics, artifacts and a model
FAILURE_REASON_TAG = "pipeline.failure_reason"  # why a run ended FAILED or KILLED
DATASET_DIGEST_TAG = "pipeline.dataset_digest"
CONFIG_DIGEST_TAG = "pipeline.config_digest"
GIT_COMMIT_TAG = "git_commit"
MLFLOW_GIT_COMMIT_TAG = "mlflow.source.git.commit"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: nests a trial under its search
SUBMITTED_COMMAND_TAG = "pipeline.command"  # Ray job metadata: which job script was submitted
# The environment variable `pipeline submit` sets to the submitter's commit: a job's working_dir
# has no .git, so runs on a cluster read their git_commit tag from it.
GIT_COMMIT_ENV = "PIPELINE_GIT_COMMIT"

# Search (pipeline tune)
SEARCH_TAG = "pipeline.search"
TRIAL_TAG = "pipeline.trial_id"
TRIAL_STATE_TAG = "pipeline.trial_state"  # completed | stopped | error
STOPPED_AT_EPOCH_TAG = "pipeline.stopped_at_epoch"
BEST_TRIAL_TAG = "pipeline.best_trial_id"
BEST_RUN_TAG = "pipeline.best_run_id"
MODEL_VERSION_TAG = "pipeline.model_version"  # the registered version a search produced
SEARCH_RUN_TAG = "pipeline.search_run_id"

# Nightly
NIGHTLY_DATE_TAG = "pipeline.nightly_date"
NIGHTLY_DECISION_TAG = "pipeline.nightly_decision"
NIGHTLY_LOCK_TAG = "pipeline.nightly_lock"  # registered-model tag: the nightly lease
NIGHTLY_MODEL_TAG = "pipeline.model_name"
NIGHTLY_CANDIDATE_TAG = "pipeline.candidate_version"
NIGHTLY_TRAINING_RUN_TAG = "pipeline.training_run_id"
NIGHTLY_CHAMPION_BEFORE_TAG = "pipeline.champion_before"
NIGHTLY_CHAMPION_AFTER_TAG = "pipeline.champion_after"
NIGHTLY_FORCED_TAG = "pipeline.forced"

# Registry
PROMOTION_LOCK_TAG = "pipeline.promotion_lock"  # registered-model tag used as a lease
ROLLED_BACK_TAG = "pipeline.rolled_back"  # on a version taken out of service by `rollback`
DECISION_PREFIX = "promotion."  # version tags recording the last promotion decision
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"

# Version tags (registered model versions): where a version came from
VERSION_DATASET_DIGEST = "dataset_digest"
VERSION_GIT_COMMIT = "git_commit"
VERSION_CONFIG_DIGEST = "config_digest"
VERSION_RUN_NAME = "run_name"

# --- Artifacts --------------------------------------------------------------------------------
CONFIG_ARTIFACT = "config.yaml"  # the resolved config a run trained with
MANIFEST_ARTIFACT = "dataset/manifest.json"  # the manifest of the data a run trained on
TEST_METRICS_ARTIFACT = "test_metrics.json"
MODEL_ARTIFACT = "model"  # the logged model's name
WEIGHTS_FILE = "weights.pt"  # in the model package: a plain state dict (weights_only load)
MODEL_META_FILE = "pipeline_model.json"  # in the model package: how to rebuild and preprocess
PULL_META_FILE = "pipeline_pull.json"  # in a pulled folder: what was pulled, sha256 per file
COMPARISON_DIR = "promotion"  # one JSON + Markdown comparison per promotion decision
NIGHTLY_REPORT_DIR = "nightly"  # report.json and report.md of a nightly run

# --- Metrics ----------------------------------------------------------------------------------
VAL_ACC = "val_acc"
TEST_ACC = "test_acc"
TEST_TOP5 = "test_top5"
TEST_LOSS = "test_loss"
BEST_VAL_ACC = "best_val_acc"
RESUMED_FROM_METRIC = "resumed_from_epoch"  # logged by a restarted run: the checkpoint's epoch
EPOCH_METRICS = ("val_acc", "val_top5", "val_loss", "train_acc", "train_loss")
SUMMARY_METRICS = (TEST_ACC, TEST_TOP5, TEST_LOSS, BEST_VAL_ACC)
