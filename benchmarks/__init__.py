"""Speed and quality of every corom-onnx variant, side by side with the PyTorch reference and the peers."""
