"""The `glmlocal` command: the Typer wiring (app.py, one library call per command) and the renderers of the
one-shot commands (convert, pull / list / rm, plan), which turn library events and results into Rich output.

May import: every stage; the interactive front ends (glmlocal.chat, glmlocal.server) only from app.py.
"""
