"""memopt.app."""
