"""``python -m mipic`` (and ``torchrun ... -m mipic train ...``): the ``mipic`` command."""

import sys

from .cli import main

sys.exit(main())
