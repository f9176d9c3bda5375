"""``load_format="gguf"``: llama.cpp ``.gguf`` files (``loader``), read as lazy tensors that
dequantize only a rank's slice (``tensor``)."""
