"""awq-edge: AWQ 4-bit quantisation and edge deployment for Hugging Face causal LMs."""
__version__ = "0.1.0"
