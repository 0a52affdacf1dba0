from glmlocal.cli.app import main

main()
