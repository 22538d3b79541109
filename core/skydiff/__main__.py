"""``python -m skydiff``: the same as the ``skydiff`` command."""

import sys

from skydiff.cli import main

sys.exit(main())
