"""Stage 2, checkpoint -> ONNX folder (installed as awq_edge.export): api (export), cli (`export`), the folder's
format (folder), the decoder graph (decoder, ops), the re-quantised head (head), the tokenizer files (tokenizer)."""
