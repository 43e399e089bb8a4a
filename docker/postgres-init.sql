-- Run by the postgres image on its first start (docker/compose.yaml): MLflow's database is
-- POSTGRES_DB (mlflow); Optuna's study lives in its own, as conf/cluster.yaml's tune.storage says.
CREATE DATABASE optuna OWNER emotr;
