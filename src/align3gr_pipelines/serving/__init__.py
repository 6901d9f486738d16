"""Serving the trained model: `recommend` (the Python API and the one request check), `recommender_model`
(the MLflow pyfunc model), `recommender_entry` (the file MLflow runs to build it), `server` (an HTTP
server for the logged model with request-size limits and errors that never echo the input)."""
