"""``python -m due_ext``: the command-line interface (see :mod:`due_ext.cli`)."""

from due_ext.cli import main

if __name__ == "__main__":
    main()
