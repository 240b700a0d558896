"""Command-line entry points that are not Trainer methods (``python -m xright_pl <command>``). Nothing in
the library imports them."""
