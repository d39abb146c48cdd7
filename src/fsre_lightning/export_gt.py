"""`python -m fsre_lightning.export_gt` (the command: `fsre_lightning.cli.export_gt`)."""

import sys

from fsre_lightning.cli.export_gt import main

if __name__ == "__main__":
    sys.exit(main())
