"""Running the platform on more than one node (see README.md in this folder)."""
