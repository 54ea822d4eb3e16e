"""``python -m hvd_largebatch.cli COMMAND ...``: the same as the ``hvd-largebatch`` command."""
import sys

from hvd_largebatch.cli.main import main

sys.exit(main())
