"""The training harness of the CLI, the demo and the benchmarks: ``data`` (bundled and synthetic
datasets), ``fit`` (a training loop over ``effcompile.train_step`` with per-epoch metrics) and
``reports`` (JSON metrics, learning-curve PNGs, Markdown tables)."""
