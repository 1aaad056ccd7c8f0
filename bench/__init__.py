"""`make bench`: taskmux against raw ONNX Runtime and one-encoder-per-task, in one run."""
