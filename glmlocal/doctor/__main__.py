"""`python -m glmlocal.doctor --cmake-args` (standard library only, so a CI script can call it before
llama-cpp-python or glmlocal's dependencies are installed) and `--child MODE ...` (the doctor's child process)."""

import sys

if sys.argv[1:2] == ["--cmake-args"]:
    from glmlocal.doctor.build import cpu_cmake_args

    print(cpu_cmake_args())
    sys.exit(0)
if len(sys.argv) > 2 and sys.argv[1] == "--child":
    from glmlocal.doctor.checks import _child_main

    sys.exit(_child_main(sys.argv[2:]))
sys.exit(2)
