"""`python -m flows` is the `recranker` command."""

from flows.cli import main

main()
