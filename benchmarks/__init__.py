"""Speed and memory of twincar_fast against a plain PyTorch reference, side by side."""
