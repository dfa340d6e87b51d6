"""``python -m replication`` is the ``replication`` command."""

import sys

from .cli import main

sys.exit(main())
