"""Other serving engines measured beside ours, each in its own virtual environment (never a project dependency)."""
