"""``python -m edgeseg`` (and ``torchrun -m edgeseg train ...``)."""

import sys

from .cli import main

sys.exit(main())
