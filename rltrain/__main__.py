"""``python -m rltrain ...``: the ``rltrain`` command."""

if __name__ == "__main__":
    from rltrain.cli import main

    main()
