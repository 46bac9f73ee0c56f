"""Plain helpers shared by tests (no tests here): fixtures-on-disk writers, oracles, tiny configs and batches.

Import them as `from tests.helpers.<module> import name`; pytest fixtures live in conftest.py files instead."""
