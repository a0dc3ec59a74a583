"""Recipe runs: ordered, cached, resumable stages; the run manifest; re-verification (check).

Import-light on purpose: the stages import the heavy stacks (torch, tensorflow, executorch)
only when they run.
"""

from toolchain.pipeline.core import Pipeline, RunContext, Stage, StageOutput, StageReport, sha256_file
from toolchain.pipeline.runner import RunResult, run_recipe
from toolchain.pipeline.verify import CheckRow, check_run_dir

__all__ = ["Pipeline", "RunContext", "Stage", "StageOutput", "StageReport", "RunResult",
           "run_recipe", "check_run_dir", "CheckRow", "sha256_file"]
