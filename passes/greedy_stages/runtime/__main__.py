"""``python -m effcompile.passes.greedy_stages.runtime`` (and torchrun ``-m``): see launcher.main."""

from .launcher import main

if __name__ == "__main__":
    main()
