"""effcompile's benchmarks (not installed): ``python -m benchmarks <name> ...`` from a checkout.

Each module measures one technique (or all of them, ``suite``) against plain backprop in the same
run; the shell scripts beside this file hold the committed settings, and ``results/`` the
committed numbers (``<machine>-<date>-*.json``).
"""
