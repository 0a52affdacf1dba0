"""Where a model will live before it is loaded: the hardware probe, the footprint (bytes per tensor, from a GGUF
header or from models.toml), the compute-graph replay that predicts llama.cpp's buffers, the planner that makes
a Placement, the tables that show one, and the smallest machine each model needs (minimum.py).

May import: glmlocal.errors, glmlocal.models, glmlocal.llama (device probe), quantize (recipe, GGUF reader).
"""
