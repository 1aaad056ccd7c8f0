"""The model repository: the ONNX encoder, its tokenizer, the heads, and their manifest."""
