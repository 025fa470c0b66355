"""memopt.formats."""
