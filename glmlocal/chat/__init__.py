"""`glmlocal chat`: the Rich REPL, its input line, piped mode, the transcript (autosave, /save, /load), one turn's
live view. A front end: it opens its model through glmlocal.launch and talks to an engine Session.

May import: everything below it (glmlocal.launch, engine, glm, plan, models). Never glmlocal.server.
"""
