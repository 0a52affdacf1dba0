"""GLM-4.x safetensors -> GGUF converter: llama.cpp-identical type recipe, ggml quantizer via ctypes,
streaming GGUF writer and header-only GGUF reader. Entry point: `quantize.convert.convert`.

Stands alone: imports nothing from glmlocal (its errors are quantize.errors; which copy of llama-cpp-python's
libggml to open is quantize.libs, which glmlocal.llama uses too). glmlocal sits above it.
"""
