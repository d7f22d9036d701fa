-- One PostgreSQL, three databases: MLflow's (POSTGRES_DB, created by the image),
-- Prefect server's and tuneloop serve's prediction store.
CREATE DATABASE prefect;
CREATE DATABASE predictions;
