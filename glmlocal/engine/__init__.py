"""Running a model: the Engine (a llama.cpp model + context), its decode loop (batch.py: several sequences in
one llama_decode per step, per-sequence sampler chains in sampler.py, slots and prefix reuse in slots.py, the
hooks speculative decoding plugs into in hooks.py, the numpy-backed llama_batch both contexts fill in
llbatch.py), Placement -> llama.cpp parameters, the pure pieces of
generation (sampling settings, stop strings, UTF-8, the state cache), and the Session that turns chat messages
into GLM events.

May import: glmlocal.errors, glmlocal.llama, glmlocal.plan (Placement, the planner for an unplanned load),
glmlocal.glm. Nothing here knows about HTTP or the terminal.
"""
