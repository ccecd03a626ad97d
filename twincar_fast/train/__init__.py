"""Fitting one run: the staged, resumable fit, its callbacks and the run folders it writes."""
