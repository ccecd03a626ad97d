"""Fitting one run: the staged, resumable fit, its callbacks and what it writes into its run folder."""
