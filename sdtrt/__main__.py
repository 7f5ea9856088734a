import sys

from sdtrt.cli import main

sys.exit(main())
