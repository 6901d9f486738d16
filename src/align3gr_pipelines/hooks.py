"""Project hooks (lineage, staleness, MLflow logging of stage metrics) are registered here."""

PROJECT_HOOKS: tuple = ()
