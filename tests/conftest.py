"""Shared pytest fixtures."""

from servers import *  # noqa: F403 - session fixtures that start real servers (Redis, Valkey…)
