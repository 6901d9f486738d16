"""Toy Kedro package for the integration tests (see ../../pyproject.toml)."""
