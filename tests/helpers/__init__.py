"""Helpers shared by the test modules (importable as ``helpers``: pytest.ini puts tests/ on
the path). Test modules import from here, never from each other."""
