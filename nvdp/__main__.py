import sys

from nvdp.cli import main

sys.exit(main())
