"""The AutoAWQ GEMM checkpoint folder: hf_folder reads a Hugging Face folder's files, writer writes the checkpoint,
reader reads it back for every later stage."""
