"""`python -m membacking` runs the command line."""

from .cli import main

main()
