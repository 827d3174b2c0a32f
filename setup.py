"""Everything is in pyproject.toml except one build step: install peft-seft-autoregister.pth into site-packages.

A .pth file must sit at the top of site-packages, which package data cannot reach. It is copied there in both the
regular wheel (from build_lib) and the editable wheel (which setuptools assembles in install_lib).
"""

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "peft-seft-autoregister.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        self.mkpath(target)
        self.copy_file(PTH, f"{target}/{PTH}")


setup(cmdclass={"build_py": BuildPyWithPth})
