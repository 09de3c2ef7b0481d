"""One exception type for user mistakes, so the CLI can print them as one line."""


class UserError(Exception):
    """Bad input from the user (file, option, config). The CLI prints it and exits 2."""


class Stopped(Exception):
    """A long stage stopped on request (SIGTERM / SIGINT) after writing a checkpoint."""

    def __init__(self, stage: str, step: int, folder: str = ""):
        super().__init__(f"{stage} stopped at step {step}; checkpoint written{' in ' + folder if folder else ''}; "
                         "rerun the same command to resume")
        self.stage, self.step = stage, step
