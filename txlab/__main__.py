import sys

from txlab.cli import main

sys.exit(main())
