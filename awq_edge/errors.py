"""One exception type whose message names the problem and the fix."""


class AwqEdgeError(Exception):
    """A user-facing failure: `problem` says what is wrong, `fix` what to do."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem} (fix: {fix})")
        self.problem = problem
        self.fix = fix
