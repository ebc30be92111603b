"""`python -m nxd_autoshard verify ...`"""

import sys

from .cli import main

sys.exit(main())
