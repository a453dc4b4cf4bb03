"""`python -m flows` is the `recranker` command."""

from cli import main

main()
