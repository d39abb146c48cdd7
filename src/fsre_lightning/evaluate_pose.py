"""`python -m fsre_lightning.evaluate_pose` (the command: `fsre_lightning.cli.evaluate_pose`)."""

import sys

from fsre_lightning.cli.evaluate_pose import main

if __name__ == "__main__":
    sys.exit(main())
