"""Getting model files: the registry (models.toml), the local store, the hub client, `pull`, and published
GGUF headers read remotely with HTTP Range requests.

May import: glmlocal.errors, quantize (the converter, the GGUF header reader). Never prints: progress is events.
"""
