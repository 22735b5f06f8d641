import sys

from kvcompress.cli import main

sys.exit(main())
