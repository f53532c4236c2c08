"""``python -m memstream.cli``: the ``memstream`` command."""

import sys

from memstream.cli import main

sys.exit(main())
