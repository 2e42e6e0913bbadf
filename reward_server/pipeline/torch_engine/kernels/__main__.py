import sys

from reward_server.pipeline.torch_engine.kernels import main

sys.exit(main())
