"""Prefect flows chaining the tasks. Importing this package sets the offline environment first."""

import tasks  # noqa: F401  (applies the offline environment before Prefect is imported)
