"""Shipping a trained model: the exported model folder and inference from it (`Predictor`)."""
