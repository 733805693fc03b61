"""Entry point of ``python -m training`` and ``accelerate launch -m training``."""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
