"""C{python -m sidero.agent}: see L{sidero.agent.main}."""

import sys

from sidero.agent.main import main

if __name__ == "__main__":
    sys.exit(main())
