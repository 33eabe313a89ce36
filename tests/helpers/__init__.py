"""Plain helpers of the tests (no fixtures: those are in tests/conftest.py)."""
