"""MLflow run tags shared by training, search and nightly runs (import-light: no MLflow, no Ray)."""

KIND_TAG = "pipeline.kind"  # train (untagged), tune (a search's parent run), trial, nightly
