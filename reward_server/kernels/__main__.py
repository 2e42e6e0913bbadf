import sys

from reward_server.kernels import main

sys.exit(main())
