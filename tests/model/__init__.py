"""Model-library tests. A package (not a bare directory) so that its conftest.py is imported as
`model.conftest` and never shadows tests/conftest.py, which other tests import as `conftest`."""
