"""corom-onnx exporter: PyTorch BERT encoder -> ONNX variants, each proven against the reference."""
