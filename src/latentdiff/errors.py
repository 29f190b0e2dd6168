"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (file, key, shape or value); the message names the problem."""


class SettingError(UserError):
    """A generation setting the model or the sampler cannot take; ``field`` names the setting.

    The message reads ``field: problem``, so the CLI can name its option and the web API its field.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem
