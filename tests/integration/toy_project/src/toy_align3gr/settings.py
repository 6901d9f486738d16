"""The real project's settings: its hooks, config loader and resolvers."""
from align3gr_pipelines.settings import *  # noqa: F401,F403
