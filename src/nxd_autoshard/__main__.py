"""`python -m nxd_autoshard verify ...`"""

import sys

from nxd_autoshard.tools.cli import main

sys.exit(main())
