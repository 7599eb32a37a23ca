"""Prefect tasks wrapping ddpm/. Importing this package sets the offline environment first."""

from tasks.settings import apply_offline_environment

apply_offline_environment()
