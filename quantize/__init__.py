"""GLM-4.x safetensors -> GGUF converter: llama.cpp-identical type recipe, ggml quantizer via ctypes,
streaming GGUF writer and header-only GGUF reader. Entry point: `quantize.convert.convert`.

Stands alone: imports nothing from glmlocal (its errors are quantize.errors; which copy of llama-cpp-python's
libggml to open is quantize.libs, which glmlocal.llama uses too). glmlocal sits above it. GGUF's constants (value
types, ggml types and block sizes, file and token types) are gguf-py's (the `gguf` package); the writer is our own
because it streams (gguf-py's takes whole tensors), and so is the header reader (it reads a header alone).
"""
