"""`python -m dicomweb_server` -> cli.main()."""

import sys

from dicomweb_server.cli import main

sys.exit(main())
