"""Serving the trained model: `recommend` (the Python API), `recommender_model` (the MLflow pyfunc model),
`recommender_entry` (the file MLflow runs to build it)."""
