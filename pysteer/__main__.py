"""``python -m pysteer`` runs the CLI (through ``console``, quiet about an early Ctrl-C)."""

import sys

from pysteer.console import main

sys.exit(main())
