"""``python -m locft_dist`` is the ``locft`` command (so are ``torchrun -m`` and ``accelerate launch -m``)."""

import sys

from locft_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
