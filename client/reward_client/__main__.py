"""``python -m reward_client`` runs the ``reward-client`` command line."""

import sys

from reward_client.cli import main

sys.exit(main())
