"""llama.cpp below what llama-cpp-python wraps: ggml devices and buffer types, tensor overrides, llama.cpp's
log, RPC devices. The only stage that talks ctypes to ggml directly.

May import: glmlocal.errors, quantize.libs (which copy of each shared library to open), llama_cpp.
Libraries are opened on first use, never at import time.
"""
