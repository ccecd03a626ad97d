"""Shipping a trained model: the model folder (config.json, safetensors), ONNX, prediction (torch and
ONNX backends, the predict CLI), checkpoint import and the Gradio app."""
