"""The commands: one module per ``rltrain`` command, holding its ``main`` (arguments, Hydra, one-line errors).

This is the top layer: ``rltrain.cli`` dispatches to these modules, and they call the library (every other module of
``rltrain``), which never imports them (tests/test_import_graph.py). ``setup`` holds what they share.
"""
