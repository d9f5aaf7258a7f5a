"""One exception type whose message names the problem and the fix."""


def _one_line(text: str) -> str:
    # A quoted library message may hold line breaks; the CLI's contract is one line per error.
    return " ".join(str(text).splitlines())


class AwqEdgeError(Exception):
    """A user-facing failure: `problem` says what is wrong, `fix` what to do; each on one line."""

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = _one_line(problem), _one_line(fix)
        super().__init__(f"{self.problem} (fix: {self.fix})")
