"""`python -m glmlocal.doctor --cmake-args` (standard library only, so a CI script can call it before
llama-cpp-python or glmlocal's dependencies are installed) and `--child MODE ...` (the doctor's child process).

--cmake-args prints the flags on stdout (so `CMAKE_ARGS="$(...)"` captures only them) and one line on stderr
saying which backend was chosen and why."""

import sys

if sys.argv[1:2] == ["--cmake-args"]:
    from glmlocal.doctor.build import choose_build

    choice = choose_build()
    print(f"glmlocal: {choice.reason}", file=sys.stderr)
    print(choice.args)
    sys.exit(0)
if len(sys.argv) > 2 and sys.argv[1] == "--child":
    from glmlocal.doctor.checks import _child_main

    sys.exit(_child_main(sys.argv[2:]))
sys.exit(2)
