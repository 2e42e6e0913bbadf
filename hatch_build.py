"""The wheel's build hook: compile the native kernels for every instruction set and ship them.

`reward_server/pipeline/torch_engine/kernels/build.py` compiles them into `lib/` beside their
sources (reused when already up to date, as after `make setup`); this hook adds that folder to the
wheel and marks the wheel as platform-specific (cp3XX-cp3XX-linux_x86_64: pip installs it only
where the modules can load). An editable install ships nothing: the checkout's `lib/` is read in
place.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

KERNELS = Path(__file__).resolve().parent / "reward_server" / "pipeline" / "torch_engine" / "kernels"


class KernelsBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        # loaded by path: importing the package would import the server's dependencies
        spec = importlib.util.spec_from_file_location("reward_kernels_build", KERNELS / "build.py")
        build = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = build  # dataclasses look their module up there
        spec.loader.exec_module(build)
        folder = build.build_all(build.LIBRARY, log=self.app.display_info)
        for path in sorted(folder.iterdir()):
            build_data["force_include"][str(path)] = f"{folder.relative_to(KERNELS.parents[3]).as_posix()}/{path.name}"
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
