"""``python -m vlmkern``: the command line of the application floor (vlmkern.app.cli).

The one module at the top of the package that reaches up to the application; nothing imports
it (``import vlmkern`` does not), see docs/ARCHITECTURE.md."""
import sys

from .app.cli import main

sys.exit(main())
