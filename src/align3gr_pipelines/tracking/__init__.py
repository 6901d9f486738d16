"""Around the DAG: Kedro/MLflow `hooks`, artifact `lineage` (staleness), `warning_filters` (third-party
noise kept out of the log)."""
