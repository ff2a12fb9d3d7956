#!/bin/sh
# MLflow's own PostgreSQL role and its two databases: "mlflow" (runs, metrics, registry) and
# "mlflow_auth" (basic-auth users and permissions). The role may log in and owns both databases,
# and nothing more: NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS, so a leaked
# MLflow password reaches MLflow's data but not the server (no COPY ... PROGRAM, no other
# databases, no new roles). The superuser (POSTGRES_USER) stays inside the postgres container.
#
# Run once by the postgres image's entrypoint, when the data directory is initialised (it sources
# *.sh files in /docker-entrypoint-initdb.d); used by postgres.yaml (via kustomization.yaml) and
# compose.yaml. Needs MLFLOW_DB_USER and MLFLOW_DB_PASSWORD in the environment: psql reads them
# with \getenv (psql >= 15), so the password is in neither the process list nor a file.
: "${MLFLOW_DB_USER:?must be set: the PostgreSQL role MLflow connects as}"
: "${MLFLOW_DB_PASSWORD:?must be set: that role's password}"
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
\getenv mlflow_role MLFLOW_DB_USER
\getenv mlflow_password MLFLOW_DB_PASSWORD
CREATE ROLE :"mlflow_role" LOGIN PASSWORD :'mlflow_password'
    NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
CREATE DATABASE mlflow OWNER :"mlflow_role";
CREATE DATABASE mlflow_auth OWNER :"mlflow_role";
REVOKE ALL ON DATABASE mlflow, mlflow_auth FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE mlflow, mlflow_auth TO :"mlflow_role";
SQL
