"""Fixtures shared by the tests of ``apex_assets.lib`` (the torch-thread guard is in the
root conftest, for every test)."""
