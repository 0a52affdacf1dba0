from glmlocal.cli import main

main()
