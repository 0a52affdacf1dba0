"""GLM-4.x safetensors -> GGUF converter: llama.cpp-identical type recipe, ggml quantizer via ctypes,
streaming GGUF writer and header-only GGUF reader. Entry point: `quantize.convert.convert`."""
