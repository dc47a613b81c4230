"""The one exception type parscale raises for bad input; the CLI turns it into a one-line error."""


class ParScaleError(Exception):
    """Bad input (config, checkpoint, data, flags). The message names the field/file and the problem."""
