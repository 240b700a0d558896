"""The bottom layer: errors, batch types, the optimum file, assets, the command line's helpers, every
private Lightning access, the demo task. Imports no other xright_pl folder."""
