"""`glmlocal doctor`: build flags for this machine (build.py, standard library only: it runs before anything is
installed), the checks (checks.py: llama.cpp is exercised in a child process, so a crashing build is
reported, not fatal; memory.py: RAM and disk against what the GLM-4.x models need), the Check they return
(result.py) and their rendering (view.py).

May import: everything below the front ends. This __init__ imports nothing, so
`python -m glmlocal.doctor --cmake-args` works on a bare Python.
"""
