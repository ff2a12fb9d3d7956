-- Second database on the same server: MLflow basic auth keeps its users and permissions
-- apart from the tracking data (database "mlflow", created by POSTGRES_DB). Runs once, when the
-- data directory is initialised. Used by postgres.yaml (via kustomization.yaml) and compose.yaml.
CREATE DATABASE mlflow_auth;
