"""End-to-end tests of the service (a package, so that its conftest never shadows tests/conftest.py)."""
