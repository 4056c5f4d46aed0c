"""Exception types with stable error codes; a code is what dead letters and metrics are labelled by."""


class ProcessingError(Exception):
    """This event cannot be processed, ever: it goes to the dead-letter topic with `code`."""

    def __init__(self, code: str, reason: str, product_id: str | None = None):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.product_id = product_id  # when the event got far enough to name its product


class RetryableError(Exception):
    """A dependency (broker, Redis) failed; the same event may succeed later. Base of the checkpoint errors."""


class DeliveryError(RetryableError):
    """Checkpoint step 1: the producer could not deliver every record of the batch."""


class SinkError(RetryableError):
    """Checkpoint step 2: Redis could not be written."""


class CommitError(RetryableError):
    """Checkpoint step 3: the consumer could not commit offsets."""
