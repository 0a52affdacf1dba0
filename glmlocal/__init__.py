"""glmlocal: run GLM-4.x MoE models locally on llama.cpp."""

__version__ = "0.1.0"
