class IngestError(ValueError):
    """Bad input: the message names the file and the reason; nothing was written."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)
