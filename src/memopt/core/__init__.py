"""memopt.core."""
