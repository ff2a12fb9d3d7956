#!/usr/bin/env bash
# MLflow's tracking server with basic auth, configured only through environment variables so that
# no credential appears in a manifest or a process list. Used by infra/k8s/mlflow.yaml and
# infra/compose.yaml (installed in the training image as /usr/local/bin/mlflow-server).
#
# Required:
#   MLFLOW_BACKEND_STORE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow (runs, registry)
#   MLFLOW_AUTH_DATABASE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow_auth (users)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://bucket/prefix, proxied by the server (--serve-artifacts)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key; the same on every replica
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin user's password, used once to create it
#   MLFLOW_SERVER_ALLOWED_HOSTS     Host headers accepted, e.g. mlflow:5000,localhost:5000
# Optional: MLFLOW_AUTH_ADMIN_USERNAME (admin), MLFLOW_AUTH_DEFAULT_PERMISSION (READ),
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2); AWS_* / MLFLOW_S3_ENDPOINT_URL
#   for the artifact store.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?must be set, e.g. postgresql://USER:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?must be set, e.g. postgresql://USER:PASSWORD@postgres:5432/mlflow_auth}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?must be set, e.g. s3://pipeline/mlartifacts}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?must be set (basic auth needs a static CSRF key)}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?must be set (MLflow ships no default admin password)}"
: "${MLFLOW_SERVER_ALLOWED_HOSTS:?must be set, e.g. mlflow:5000,localhost:5000}"

# basic_auth.ini keeps the user store in PostgreSQL rather than a SQLite file inside the
# container, which would lose every user at the next restart. Written with umask 077 because it
# holds the database password; configparser reads % as interpolation, so it is doubled.
umask 077
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-${TMPDIR:-/tmp}/basic_auth.ini}"
cat >"$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

# --backend-store-uri and --artifacts-destination come from MLFLOW_BACKEND_STORE_URI and
# MLFLOW_ARTIFACTS_DESTINATION (mlflow server reads both from the environment).
exec mlflow server \
    --app-name basic-auth \
    --serve-artifacts \
    --host "${MLFLOW_HOST:-0.0.0.0}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-2}" \
    --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS"
