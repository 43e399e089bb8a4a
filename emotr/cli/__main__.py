"""`python -m emotr.cli`: the `emotr` command."""

from emotr.cli.main import main

main()
