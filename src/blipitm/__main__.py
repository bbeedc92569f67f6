"""``python -m blipitm``: the ``blipitm`` command."""

import sys

from blipitm.cli.main import main

sys.exit(main())
