"""memopt.step."""
